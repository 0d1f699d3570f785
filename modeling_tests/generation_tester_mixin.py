"""A generation test mixin in the shape of Transformers' `GenerationTesterMixin`, which its sdist does not ship.

Each test checks `generate` against an independent reference: greedy against a loop of full forward passes
without a cache, beam scores against log-probabilities recomputed by one forward pass, batched left-padded rows
against the same rows alone, continued generation against one uninterrupted call.

The class using it provides `model_tester` (whose `prepare_config_and_inputs_for_common` returns a config and
inputs `generate` accepts, one image per row, so the first rows of every input belong together) and
`all_model_classes`. Tests run on the first `generation_batch_size` rows; `max_new_tokens` bounds every call.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache


class GenerationTesterMixin:
    model_tester = None
    max_new_tokens = 3
    generation_batch_size = 2

    @property
    def all_generative_model_classes(self) -> tuple[type[PreTrainedModel], ...]:
        return tuple(model_class for model_class in self.all_model_classes if model_class.can_generate())

    def generative_models(self) -> list[tuple[PreTrainedModel, dict[str, torch.Tensor]]]:
        """Each generative class built on the tester's config, without an end-of-sequence token, and its inputs.

        Without EOS every call writes exactly `max_new_tokens`, so sequences compare position by position.
        """
        models = []
        for model_class in self.all_generative_model_classes:
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            inputs = {name: value[: self.generation_batch_size] for name, value in inputs.items()}
            torch.manual_seed(0)
            model = model_class(config).eval()
            model.generation_config.eos_token_id = None
            models.append((model, inputs))
        return models

    def reference_next_token_scores(self, model: PreTrainedModel, logits: torch.Tensor) -> torch.Tensor:
        """Next-token scores a plain greedy decoder picks from; override to mirror tokens `generate` suppresses."""
        return logits

    def reference_greedy(
        self, model: PreTrainedModel, inputs: dict[str, Any], num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding by full forward passes without a cache.

        Returns the new tokens, `(batch, num_tokens)`, and the scores each was picked from, `(batch, num_tokens,
        vocab)`.
        """
        inputs = dict(inputs)
        new_tokens, all_scores = [], []
        with torch.no_grad():
            for _ in range(num_tokens):
                logits = model(**inputs, use_cache=False).logits[:, -1]
                scores = self.reference_next_token_scores(model, logits)
                token = scores.argmax(dim=-1, keepdim=True)
                new_tokens.append(token)
                all_scores.append(scores)
                inputs["input_ids"] = torch.cat([inputs["input_ids"], token], dim=1)
                if inputs.get("attention_mask") is not None:
                    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        return torch.cat(new_tokens, dim=1), torch.stack(all_scores, dim=1)

    def generate(self, model: PreTrainedModel, inputs: dict[str, Any], **kwargs: Any) -> Any:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": False, **kwargs}
        return model.generate(**copy.deepcopy(inputs), **kwargs)

    def new_tokens(self, sequences: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        return sequences[:, inputs["input_ids"].shape[1] :]

    def test_greedy_generate(self):
        """Cached greedy decoding writes the tokens, and reports the scores, of uncached full forward passes."""
        for model, inputs in self.generative_models():
            output = self.generate(model, inputs, return_dict_in_generate=True, output_scores=True)
            prompt_length = inputs["input_ids"].shape[1]
            expected_shape = (len(inputs["input_ids"]), prompt_length + self.max_new_tokens)
            self.assertEqual(tuple(output.sequences.shape), expected_shape)
            torch.testing.assert_close(output.sequences[:, :prompt_length], inputs["input_ids"])
            tokens, scores = self.reference_greedy(model, inputs, self.max_new_tokens)
            torch.testing.assert_close(self.new_tokens(output.sequences, inputs), tokens)
            # where the reference suppresses a token (-inf), `generate` may score it as it likes
            kept = scores.isfinite()
            torch.testing.assert_close(torch.stack(output.scores, dim=1)[kept], scores[kept], atol=1e-5, rtol=1e-5)

    def test_greedy_generate_dict_outputs(self):
        for model, inputs in self.generative_models():
            output = self.generate(
                model,
                inputs,
                return_dict_in_generate=True,
                output_scores=True,
                output_logits=True,
                output_hidden_states=True,
                output_attentions=model.config._attn_implementation == "eager",
            )
            torch.testing.assert_close(output.sequences, self.generate(model, inputs))
            batch_size, vocab_size = len(inputs["input_ids"]), model.get_output_embeddings().out_features
            self.assertEqual(len(output.scores), self.max_new_tokens)
            self.assertEqual(len(output.logits), self.max_new_tokens)
            self.assertEqual(len(output.hidden_states), self.max_new_tokens)
            for scores, logits in zip(output.scores, output.logits):
                self.assertEqual(tuple(scores.shape), (batch_size, vocab_size))
                self.assertEqual(tuple(logits.shape), (batch_size, vocab_size))
            # the first step sees the whole prompt, every later one the single new token
            prompt_length = output.hidden_states[0][-1].shape[1]
            self.assertGreaterEqual(prompt_length, inputs["input_ids"].shape[1])
            self.assertEqual([step[-1].shape[1] for step in output.hidden_states[1:]], [1] * (self.max_new_tokens - 1))
            self.assertIsInstance(output.past_key_values, Cache)
            self.assertEqual(output.past_key_values.get_seq_length(), prompt_length + self.max_new_tokens - 1)

    def test_generate_without_cache_matches_with_cache(self):
        for model, inputs in self.generative_models():
            torch.testing.assert_close(self.generate(model, inputs, use_cache=False), self.generate(model, inputs))

    def test_sample_generate(self):
        for model, inputs in self.generative_models():
            sampled = []
            for _ in range(2):
                torch.manual_seed(0)
                sampled.append(self.generate(model, inputs, do_sample=True, num_return_sequences=2, top_k=0))
            prompt_length = inputs["input_ids"].shape[1]
            self.assertEqual(
                tuple(sampled[0].shape), (2 * len(inputs["input_ids"]), prompt_length + self.max_new_tokens)
            )
            torch.testing.assert_close(sampled[0], sampled[1])
            torch.testing.assert_close(sampled[0][:, :prompt_length], inputs["input_ids"].repeat_interleave(2, dim=0))
            # sampling among the single most likely token is greedy decoding
            torch.testing.assert_close(
                self.generate(model, inputs, do_sample=True, top_k=1), self.generate(model, inputs)
            )

    def test_beam_search_generate(self):
        """Each returned beam's score is the summed log-probability of its new tokens (no length penalty)."""
        num_beams = 2
        for model, inputs in self.generative_models():
            output = self.generate(
                model,
                inputs,
                num_beams=num_beams,
                num_return_sequences=num_beams,
                length_penalty=0.0,
                return_dict_in_generate=True,
                output_scores=True,
            )
            prompt_length = inputs["input_ids"].shape[1]
            expected_shape = (num_beams * len(inputs["input_ids"]), prompt_length + self.max_new_tokens)
            self.assertEqual(tuple(output.sequences.shape), expected_shape)
            beam_inputs = {
                name: value.repeat_interleave(num_beams, dim=0) if isinstance(value, torch.Tensor) else value
                for name, value in inputs.items()
            }
            torch.testing.assert_close(output.sequences[:, :prompt_length], beam_inputs["input_ids"])
            new_tokens = self.new_tokens(output.sequences, inputs)
            beam_inputs["input_ids"] = output.sequences
            if beam_inputs.get("attention_mask") is not None:
                beam_inputs["attention_mask"] = torch.cat(
                    [beam_inputs["attention_mask"], torch.ones_like(new_tokens)], dim=1
                )
            with torch.no_grad():
                logits = model(**beam_inputs).logits[:, -self.max_new_tokens - 1 : -1]
            log_probs = logits.float().log_softmax(dim=-1).gather(-1, new_tokens[..., None])[..., 0]
            torch.testing.assert_close(output.sequences_scores, log_probs.sum(dim=1), atol=1e-4, rtol=1e-4)

    def test_left_padding_compatibility(self):
        """A left-padded row generates what it generates alone, token for token and score for score.

        Row 0 gets two padding tokens on the left, every other row two more text tokens, so lengths differ.
        """
        for model, inputs in self.generative_models():
            pad_token_id = model.config.get_text_config().pad_token_id
            input_ids = inputs["input_ids"]
            prefix = input_ids[:, -2:].clone()
            prefix[0] = pad_token_id
            prefix_mask = torch.ones_like(prefix)
            prefix_mask[0] = 0
            mask = inputs.get("attention_mask", torch.ones_like(input_ids))
            batch = {
                **inputs,
                "input_ids": torch.cat([prefix, input_ids], dim=1),
                "attention_mask": torch.cat([prefix_mask, mask], dim=1),
            }
            kwargs = {"return_dict_in_generate": True, "output_scores": True}
            together = self.generate(model, batch, **kwargs)
            for row in range(len(input_ids)):
                alone_inputs = {name: value[row : row + 1] for name, value in batch.items()}
                start = int(prefix_mask[row].sum() == 0) * 2
                alone_inputs["input_ids"] = alone_inputs["input_ids"][:, start:]
                alone_inputs["attention_mask"] = alone_inputs["attention_mask"][:, start:]
                alone = self.generate(model, alone_inputs, **kwargs)
                torch.testing.assert_close(
                    self.new_tokens(together.sequences, batch)[row], self.new_tokens(alone.sequences, alone_inputs)[0]
                )
                for step_together, step_alone in zip(together.scores, alone.scores):
                    torch.testing.assert_close(step_together[row], step_alone[0], atol=1e-5, rtol=1e-5)

    def test_generate_from_inputs_embeds(self):
        """`inputs_embeds` of the prompt generate the same new tokens as its `input_ids` (and return only those)."""
        for model, inputs in self.generative_models():
            embeds_inputs = {name: value for name, value in inputs.items() if name != "input_ids"}
            embeds_inputs["inputs_embeds"] = model.get_input_embeddings()(inputs["input_ids"]).detach()
            from_embeds = model.generate(**embeds_inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            torch.testing.assert_close(from_embeds, self.new_tokens(self.generate(model, inputs), inputs))

    def test_generate_continue_from_past_key_values(self):
        """Generating 3 tokens, then 3 more from the first call's cache, equals generating 6 at once.

        One conversation at a time, as a chat continues: models that re-lay out a batch on expansion (Setokim
        re-pads rows whose images became different token counts) cannot line a batch up with its cache.
        """
        for model, inputs in self.generative_models():
            for row in range(len(inputs["input_ids"])):
                conversation = {name: value[row : row + 1] for name, value in inputs.items()}
                first = self.generate(model, conversation, return_dict_in_generate=True)
                continued_inputs = {**conversation, "input_ids": first.sequences}
                if conversation.get("attention_mask") is not None:
                    continued_inputs["attention_mask"] = torch.ones_like(first.sequences)
                continued = self.generate(model, continued_inputs, past_key_values=first.past_key_values)
                at_once = self.generate(model, conversation, max_new_tokens=2 * self.max_new_tokens)
                torch.testing.assert_close(continued, at_once)

    def test_past_key_values_format(self):
        """The cache holds one layer per decoder layer, over every position the language model saw."""
        for model, inputs in self.generative_models():
            with torch.no_grad():
                output = model(**inputs, use_cache=True)
            cache = output.past_key_values
            self.assertIsInstance(cache, Cache)
            text_config = model.config.get_text_config()
            self.assertEqual(len(cache.layers), text_config.num_hidden_layers)
            self.assertEqual(cache.get_seq_length(), output.logits.shape[1])
            head_dim = (
                getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
            )
            expected = (len(inputs["input_ids"]), text_config.num_key_value_heads, output.logits.shape[1], head_dim)
            for layer in cache.layers:
                self.assertEqual(tuple(layer.keys.shape), expected)
                self.assertEqual(tuple(layer.values.shape), expected)

    def test_static_cache_matches_dynamic_cache(self):
        for model, inputs in self.generative_models():
            torch.testing.assert_close(
                self.generate(model, inputs, cache_implementation="static"), self.generate(model, inputs)
            )

    def test_prompt_lookup_decoding_matches_greedy_search(self):
        """Prompt lookup feeds several candidate tokens per step through the cache; it must not change the result.

        The prompt ends with a bigram it already holds, so the lookup has a candidate from the first step on.
        """
        for model, inputs in self.generative_models():
            single = {name: value[:1] for name, value in inputs.items()}
            single["input_ids"] = torch.cat([single["input_ids"], single["input_ids"][:, -3:-1]], dim=1)
            single["attention_mask"] = torch.ones_like(single["input_ids"])
            kwargs = {"max_new_tokens": 4, "return_dict_in_generate": True, "output_scores": True}
            looked_up = self.generate(model, single, prompt_lookup_num_tokens=2, **kwargs)
            greedy = self.generate(model, single, **kwargs)
            torch.testing.assert_close(looked_up.sequences, greedy.sequences)
            torch.testing.assert_close(torch.stack(looked_up.scores), torch.stack(greedy.scores), atol=1e-5, rtol=1e-5)
