"""SetokDetokenizerPipeline: determinism, guidance in one batched call, padding invariance, outputs, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_weights
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from pretraining_fixtures import TOKEN_SIZE, tiny_detokenizer_config

from transformers_setok import SetokDetokenizer, SetokDetokenizerPipeline, SetokTokenConditioner

STEPS = 4


@pytest.fixture
def pipe() -> SetokDetokenizerPipeline:
    torch.manual_seed(0)
    detokenizer = randomize_weights(SetokDetokenizer(tiny_detokenizer_config()), seed=3).eval()
    pipeline = SetokDetokenizerPipeline.from_detokenizer(detokenizer)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def token_batch(counts: tuple[int, ...] = (5, 3), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens padded to the largest count; padding slots hold garbage, which the mask must hide."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(len(counts), max(counts), TOKEN_SIZE, generator=generator)
    mask = torch.arange(max(counts))[None] < torch.tensor(counts)[:, None]
    return tokens, mask


def start_noise(batch: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def sample(pipe: SetokDetokenizerPipeline, tokens, mask, **kwargs) -> torch.Tensor:
    kwargs = {"num_inference_steps": STEPS, "output_type": "pt", **kwargs}
    return pipe(tokens, mask, **kwargs).images


def reference_sampling(pipe, tokens, mask, latents, guidance_scale: float) -> torch.Tensor:
    """DDIM by hand: conditional and (with guidance) unconditional predictions from two separate U-Net calls."""
    conditioner, unet, scheduler = pipe.conditioner, pipe.unet, pipe.scheduler
    with torch.no_grad():
        hidden = conditioner.projection(tokens)
        null = conditioner.projection(conditioner.null_tokens)[None].expand(tokens.shape[0], -1, -1)
        null_mask = torch.ones(null.shape[:2], dtype=torch.bool)
        scheduler.set_timesteps(STEPS)
        for timestep in scheduler.timesteps:
            prediction = unet(latents, timestep, encoder_hidden_states=hidden, encoder_attention_mask=mask).sample
            if guidance_scale > 1:
                unconditional = unet(
                    latents, timestep, encoder_hidden_states=null, encoder_attention_mask=null_mask
                ).sample
                prediction = unconditional + guidance_scale * (prediction - unconditional)
            latents = scheduler.step(prediction, timestep, latents).prev_sample
    return (latents / 2 + 0.5).clamp(0, 1)


def test_same_seed_same_images_and_other_seed_differs(pipe) -> None:
    tokens, mask = token_batch()
    first = sample(pipe, tokens, mask, generator=torch.Generator().manual_seed(0))
    second = sample(pipe, tokens, mask, generator=torch.Generator().manual_seed(0))
    other = sample(pipe, tokens, mask, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, second)
    assert (first - other).abs().max() > 1e-2


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_sampling_equals_a_hand_written_loop_with_separate_guidance_calls(pipe, guidance_scale) -> None:
    tokens, mask = token_batch()
    latents = start_noise(2)
    images = sample(pipe, tokens, mask, latents=latents, guidance_scale=guidance_scale)
    expected = reference_sampling(pipe, tokens, mask, latents, guidance_scale)
    # guidance amplifies float32 rounding of the batched call by the guidance scale at every step, and the first
    # step (at the last timestep, where the noise is nearly all of the sample) divides it by sqrt(alpha_bar)
    torch.testing.assert_close(images, expected, atol=1e-5 * guidance_scale**3, rtol=0)


def test_guidance_runs_one_batched_unet_call_per_step(pipe) -> None:
    batches = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    sample(pipe, *token_batch(), guidance_scale=2.0, latents=start_noise(2))
    sample(pipe, *token_batch(), guidance_scale=1.0, latents=start_noise(2))
    hook.remove()
    assert batches == [4] * STEPS + [2] * STEPS


def test_guidance_changes_the_images(pipe) -> None:
    tokens, mask = token_batch()
    plain = sample(pipe, tokens, mask, latents=start_noise(2), guidance_scale=1.0)
    guided = sample(pipe, tokens, mask, latents=start_noise(2), guidance_scale=4.0)
    assert (plain - guided).abs().max() > 1e-3


def test_padding_slots_and_a_longer_neighbour_do_not_change_an_image(pipe) -> None:
    tokens, mask = token_batch(counts=(3,), seed=2)
    alone = sample(pipe, tokens, mask, latents=start_noise(1, seed=5), guidance_scale=2.0)

    padded = torch.cat([tokens, 100 * torch.randn(1, 4, TOKEN_SIZE)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)], dim=1)
    with_padding = sample(pipe, padded, padded_mask, latents=start_noise(1, seed=5), guidance_scale=2.0)

    neighbour, neighbour_mask = token_batch(counts=(9,), seed=3)
    batch = torch.cat([padded, neighbour[:, :7]]), torch.cat([padded_mask, neighbour_mask[:, :7]])
    latents = torch.cat([start_noise(1, seed=5), start_noise(1, seed=6)])
    in_batch = sample(pipe, *batch, latents=latents, guidance_scale=2.0)[:1]

    torch.testing.assert_close(with_padding, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=0)


def test_one_generator_per_image_makes_an_image_independent_of_its_batch(pipe) -> None:
    tokens, mask = token_batch()
    both = sample(pipe, tokens, mask, generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
    second = sample(pipe, tokens[1:], mask[1:], generator=[torch.Generator().manual_seed(1)])
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=0)


def test_output_types_agree(pipe) -> None:
    tokens, mask = token_batch()
    run = {
        kind: pipe(tokens, mask, num_inference_steps=STEPS, latents=start_noise(2), output_type=kind).images
        for kind in ("pt", "np", "pil", "latent")
    }
    assert run["pt"].shape == (2, 3, 8, 8) and run["np"].shape == (2, 8, 8, 3)
    np.testing.assert_allclose(run["np"], run["pt"].permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = np.stack([np.asarray(image) for image in run["pil"]])
    assert np.abs(pil.astype(int) - np.round(run["np"] * 255).astype(int)).max() <= 1
    torch.testing.assert_close(run["pt"], (run["latent"] / 2 + 0.5).clamp(0, 1))
    as_tuple = pipe(
        tokens, mask, num_inference_steps=STEPS, latents=start_noise(2), output_type="pt", return_dict=False
    )
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], run["pt"])


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize("steps", [1, STEPS])
def test_sampling_starts_at_the_last_training_timestep_unless_the_config_says_leading(
    pipe, scheduler_class, steps
) -> None:
    """The starting noise belongs to timestep T - 1 (100 training timesteps here); "leading" spacing, kept when a
    config asks for it, would start a stride early."""
    timesteps = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: timesteps.append(int(args[1])))
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    sample(pipe, *token_batch(), num_inference_steps=steps, latents=start_noise(2))
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, timestep_spacing="leading")
    sample(pipe, *token_batch(), num_inference_steps=steps, latents=start_noise(2))
    hook.remove()
    assert timesteps[0] == 99 and timesteps[steps] < 99


def test_dpm_solver_and_ddim_both_sample(pipe) -> None:
    tokens, mask = token_batch()
    ddim = sample(pipe, tokens, mask, latents=start_noise(2))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    dpm = sample(pipe, tokens, mask, latents=start_noise(2))
    assert torch.isfinite(dpm).all() and (ddim - dpm).abs().max() > 0


def test_progress_bar_config_is_honoured(pipe, capsys) -> None:
    pipe.set_progress_bar_config(disable=False, desc="detokenizing")
    sample(pipe, *token_batch())
    assert "detokenizing" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    sample(pipe, *token_batch())
    assert "detokenizing" not in capsys.readouterr().err


def test_save_load_round_trip_and_components_load_alone(pipe, tmp_path: Path) -> None:
    tokens, mask = token_batch()
    before = sample(pipe, tokens, mask, generator=torch.Generator().manual_seed(0), guidance_scale=2.0)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "SetokDetokenizerPipeline" and index["unet"] == [
        "diffusers",
        "UNet2DConditionModel",
    ]

    reloaded = SetokDetokenizerPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    after = sample(reloaded, tokens, mask, generator=torch.Generator().manual_seed(0), guidance_scale=2.0)
    assert torch.equal(before, after)

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    conditioner = SetokTokenConditioner.from_pretrained(tmp_path / "conditioner")
    scheduler = DDIMScheduler.from_pretrained(tmp_path / "scheduler")
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(unet.state_dict()[name], value), name
    assert torch.equal(conditioner.null_tokens, pipe.conditioner.null_tokens)
    assert scheduler.config.num_train_timesteps == 100


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        (dict(tokens=torch.randn(2, 5, TOKEN_SIZE + 1)), "tokens must have width"),
        (dict(token_mask=torch.ones(2, 4, dtype=torch.bool)), "token_mask"),
        (dict(token_mask=torch.zeros(2, 5, dtype=torch.bool)), "token_mask"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(guidance_scale=0.5), "guidance_scale"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(latents=torch.randn(1, 3, 8, 8)), "latents"),
    ],
)
def test_bad_input_names_the_argument(pipe, change, argument) -> None:
    tokens, mask = token_batch()
    kwargs = {"tokens": tokens, "token_mask": mask, "num_inference_steps": STEPS, **change}
    with pytest.raises(ValueError, match=argument):
        pipe(**kwargs)
