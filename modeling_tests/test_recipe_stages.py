"""The three-stage recipe end to end on a micro world: each stage trains through the stock `Trainer`, resumes from
its checkpoints, hands its model to the next stage, and the final Setokim answers, segments, draws and edits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, Trainer

from transformers_setok import SetokForPreTraining, SetokimForConditionalGeneration, shapes_world
from transformers_setok.recipes import (
    SetokPretrainingCollator,
    StageConfig,
    chat_examples,
    evaluate_world,
    spearman,
    stage_config_path,
    train_stage,
)
from transformers_setok.recipes.recipe import RECIPES_DIR, pretraining_model
from transformers_setok.recipes.training_card import stage_summary
from transformers_setok.tokenizer_training import train_sentencepiece_tokenizer
from transformers_setok.training import model_parts

MICRO_MODEL = {
    1: {
        "setok_config": {
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            "num_attention_heads": 2,
            "inner_layers": 1,
            "inter_layers": 1,
            "intermediate_size": 32,
            "token_size": 16,
            "max_tokens": 4,
        },
        "detokenizer_config": {
            "token_size": 16,
            "coordinate_channels": 4,
            "canvas_channels": 4,
            "unet_config": {
                "sample_size": 32,
                "in_channels": 11,
                "out_channels": 3,
                "block_out_channels": [8, 16],
                "layers_per_block": 1,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                "cross_attention_dim": 16,
                "attention_head_dim": 4,
                "norm_num_groups": 4,
            },
        },
        "text_config": {
            "model_type": "bert",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        "freeze_vision_model": False,
        "freeze_text_model": False,
        "layout_loss_weight": 1.0,
    },
    2: {
        "text_config": {
            "model_type": "llama",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
        },
        "mask_decoder_config": {"hidden_size": 8, "num_layers": 1, "num_attention_heads": 2, "upscale": 4},
    },
}
TASKS = {
    2: {"captions": 1, "text_to_image": 1},
    3: {"questions": 0.5, "referring": 0.5, "editing": 1, "text_to_image": 0.5},
}


def micro_recipe(folder: Path, max_steps: int = 2) -> Path:
    """The tiny recipe's three files, shrunk: 6 scenes of 32x32, minuscule models, `max_steps` steps a stage;
    stage 3 also trains the encoder and merger, at their own learning rate."""
    folder.mkdir(parents=True, exist_ok=True)
    for stage in (1, 2, 3):
        config = yaml.safe_load(stage_config_path("tiny", stage).read_text())
        config["data"].update(num_scenes=6, image_size=32)
        if stage in TASKS:
            config["data"]["tasks"] = TASKS[stage]
        if stage in MICRO_MODEL:
            config["model"] = MICRO_MODEL[stage]
        if stage == 1:
            config["tokenizer"] = {"vocab_size": 400}
        if stage == 3:  # trains the encoder and merger at their own rate too, so that path runs end to end
            config["lora"]["r"] = 4
            config["lora"]["modules_to_save"] = [*config["lora"]["modules_to_save"], "setok"]
            config["trainable"].update(vision_encoder=True, merger=True)
            config["learning_rates"] = {"vision_encoder": 3e-4, "merger": 3e-4}
        config["training"].update(
            max_steps=max_steps, per_device_train_batch_size=2, save_steps=1, logging_steps=1, warmup_steps=0
        )
        (folder / f"stage{stage}.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of all three micro stages (the tests below read its folders)."""
    recipe = micro_recipe(tmp_path_factory.mktemp("recipe"))
    out = tmp_path_factory.mktemp("run")
    for stage in (1, 2, 3):
        train_stage(StageConfig.from_file(recipe / f"stage{stage}.yaml"), out)
    return out


def test_every_stage_saves_a_model_the_next_stage_starts_from(micro_run: Path) -> None:
    pretrained = SetokForPreTraining.from_pretrained(micro_run / "stage1")
    stage2 = SetokimForConditionalGeneration.from_pretrained(micro_run / "stage2")
    final = SetokimForConditionalGeneration.from_pretrained(micro_run / "stage3")
    # stage 2 keeps the tokenizer bit for bit; stage 3 trains its encoder and merger (copies beside the LoRA
    # adapters, merged back) and nothing else of it
    for name, value in pretrained.setok.state_dict().items():
        assert torch.equal(stage2.model.setok.state_dict()[name], value), name
    tokenizer_moved = {
        name.split(".")[0]
        for name, value in stage2.model.setok.state_dict().items()
        if not torch.equal(final.model.setok.state_dict()[name], value)
    }
    assert tokenizer_moved == {"vision_model", "merger"}  # (the micro encoder is the merger's width: no projection)
    for name, value in pretrained.detokenizer.state_dict().items():
        assert torch.equal(final.detokenizer.state_dict()[name], value), name
    # stage 3 merged its LoRA adapters: a plain Setokim whose language model and heads moved
    assert not any("lora" in name for name in final.state_dict())
    moved = [
        name
        for name, value in stage2.state_dict().items()
        if name.startswith(("model.language_model.", "vision_head.", "mask_decoder."))
        and not torch.equal(final.state_dict()[name], value)
    ]
    assert any(name.startswith("model.language_model.") for name in moved)
    assert any(name.startswith("mask_decoder.") for name in moved)
    assert any(name.startswith("vision_head.") for name in moved)


def test_stage3_trains_the_encoder_and_merger_at_their_own_learning_rate(
    micro_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(micro_run / "stage2", run / "stage2")
    rates = {}
    create_optimizer = Trainer.create_optimizer

    def recording_create_optimizer(self: Trainer, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = create_optimizer(self, model)
        group_rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        for part, modules in model_parts(self.model).items():
            part_rates = {group_rate[id(p)] for m in modules for p in m.parameters() if id(p) in group_rate}
            if part_rates:
                rates[part] = part_rates
        return optimizer

    monkeypatch.setattr(Trainer, "create_optimizer", recording_create_optimizer)
    config = StageConfig.from_file(micro_recipe(tmp_path / "recipe") / "stage3.yaml")
    train_stage(config, run)
    assert config.learning_rates == {"vision_encoder": 3e-4, "merger": 3e-4}  # the micro recipe's
    heads = {part: {1e-3} for part in ("projector", "language_model", "vision_head", "mask_decoder")}
    assert rates == {"vision_encoder": {3e-4}, "merger": {3e-4}} | heads


def test_the_card_says_what_each_stage_trained_and_at_which_rates(micro_run: Path) -> None:
    summary = stage_summary(micro_run / "stage3")
    assert summary.startswith("- **Stage 3**: 2 steps of 2 examples; lr 0.001 (cosine, ")
    settings = summary.split("; ")
    rates = settings[1].removeprefix("lr 0.001 (cosine, ").removesuffix(")").split(", ")
    assert sorted(rates) == ["merger 0.0003", "vision_encoder 0.0003"]
    (trains,) = [setting for setting in settings if setting.startswith("trains ")]
    parts = {"vision_encoder", "merger", "projector", "language_model", "vision_head", "mask_decoder"}
    assert set(trains.removeprefix("trains ").split(", ")) == parts
    assert "trains" not in stage_summary(micro_run / "stage1")  # stage 1 trains its whole model


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_process_other_than_the_main_one_saves_the_model_and_writes_nothing_else(
    stage: int, micro_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FSDP and DeepSpeed gather the weights in `save_model`, so every process must call it; what only the main
    process writes (processor, log, recipe, stage 3's merged model) it must not. The stage, already trained,
    resumes at its last step and only saves."""
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    folder = run / f"stage{stage}"
    for path in folder.iterdir():
        if path.name != "checkpoints":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    saved = []
    save_model = Trainer.save_model

    def recording_save_model(self: Trainer, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not _internal_call:  # not the Trainer's own checkpoints
            saved.append(Path(output_dir))
        save_model(self, output_dir, _internal_call)

    monkeypatch.setattr(Trainer, "save_model", recording_save_model)
    monkeypatch.setattr(Trainer, "is_world_process_zero", lambda self: False)
    train_stage(StageConfig.from_file(micro_recipe(tmp_path / "recipe") / f"stage{stage}.yaml"), run)
    assert saved == [folder / "adapter" if stage == 3 else folder]
    written = {path.name for path in folder.iterdir()}
    main_process_files = {"training_log.json", "recipe.yaml", "preprocessor_config.json", "processor_config.json"}
    assert not written & main_process_files
    assert ("model.safetensors" in written) == (stage != 3)  # stage 3's is the main process's merge


def tiny_stable_diffusion(folder: Path) -> Path:
    """A Stable-Diffusion-style folder (`unet/`, `vae/`, `scheduler/`) of minuscule random models."""
    UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    ).save_pretrained(folder / "unet")
    AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(folder / "vae")
    DDPMScheduler(beta_schedule="scaled_linear").save_pretrained(folder / "scheduler")
    return folder


def test_stage1_starts_its_detokenizer_from_a_stable_diffusion_folder_or_a_saved_detokenizer(tmp_path: Path) -> None:
    config = StageConfig.from_file(micro_recipe(tmp_path / "recipe") / "stage1.yaml")
    tokenizer = train_sentencepiece_tokenizer(["red circle", "blue square"], tmp_path / "tokenizer", 300)
    folder = tiny_stable_diffusion(tmp_path / "sd")
    # the YAML's U-Net config gives way to the folder's; its other settings apply
    config.model["detokenizer_config"] |= {"coordinate_channels": 0, "canvas_channels": 0, "num_null_tokens": 3}
    config.model["detokenizer_model"] = str(folder)
    config.model["layout_loss_weight"] = 0.0
    model = pretraining_model(config, tokenizer)
    for part, source in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        expected = source.from_pretrained(folder / part).state_dict()
        loaded = getattr(model.detokenizer, part).state_dict()
        assert loaded.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(loaded[name], value), f"{part}.{name}"
    assert model.detokenizer.config.scheduler_config["beta_schedule"] == "scaled_linear"
    assert model.config.detokenizer_config.num_null_tokens == 3
    assert model.detokenizer.image_size == 16  # the folder's: 8x8 latents of a VAE that halves each side

    model.detokenizer.save_pretrained(tmp_path / "detokenizer")
    config.model["detokenizer_model"] = str(tmp_path / "detokenizer")
    again = pretraining_model(config, tokenizer)
    for name, value in model.detokenizer.state_dict().items():
        assert torch.equal(again.detokenizer.state_dict()[name], value), name


def test_a_stage_resumes_from_its_newest_checkpoint(tmp_path: Path) -> None:
    """Two steps, then a run to three that resumes: the same weights as three steps in one go."""
    config = StageConfig.from_file(micro_recipe(tmp_path / "recipe") / "stage1.yaml")
    config.training["lr_scheduler_type"] = "constant"  # the schedule must not depend on where a run stops
    config.training["max_steps"] = 3
    straight = tmp_path / "straight"
    train_stage(config, straight)
    config.training["max_steps"] = 2
    resumed = tmp_path / "resumed"
    train_stage(config, resumed)
    config.training["max_steps"] = 3
    train_stage(config, resumed)
    log = yaml.safe_load((resumed / "stage1" / "training_log.json").read_text())
    assert [entry["step"] for entry in log if "loss" in entry] == [1, 2, 3]
    expected = SetokForPreTraining.from_pretrained(straight / "stage1").state_dict()
    for name, value in SetokForPreTraining.from_pretrained(resumed / "stage1").state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)


def test_the_final_model_evaluates_on_a_held_out_world(micro_run: Path) -> None:
    model = SetokimForConditionalGeneration.from_pretrained(micro_run / "stage3")
    from transformers_setok import SetokimProcessor

    processor = SetokimProcessor.from_pretrained(micro_run / "stage3")
    results = evaluate_world(model, processor, seed=1, num_scenes=2, batch_size=2)
    world = shapes_world(1, 2, 32)
    assert len(results["questions"].examples) == len(world["questions"])
    assert len(results["text_to_image"].examples) == 2 and len(results["editing"].examples) == len(world["editing"])
    assert 0.0 <= results["questions"].metrics["accuracy"] <= 1.0
    reconstruction = results["reconstruction"].examples[0]["prediction"]
    assert reconstruction.size == (32, 32)
    counts = results["token_counts"].examples
    assert [example["num_objects"] for example in counts] == [len(s["objects"]) for s in world["captions"]["scene"]]


def test_stage1_batches_hold_each_images_phrases(tmp_path: Path) -> None:
    tokenizer = train_sentencepiece_tokenizer(["red circle", "blue square", "circle", "square"], tmp_path, 300)
    from transformers_setok import SetokImageProcessor

    image_processor = SetokImageProcessor(size={"height": 32, "width": 32})
    images = [np.zeros((32, 32, 3), dtype=np.uint8), np.full((32, 32, 3), 255, dtype=np.uint8)]
    collator = SetokPretrainingCollator(image_processor, AutoTokenizer.from_pretrained(tmp_path), max_phrases=3)
    batch = collator(
        [{"image": images[0], "concepts": ["red circle"]}, {"image": images[1], "concepts": ["blue square", "square"]}]
    )
    assert batch["concept_input_ids"].shape[:2] == (2, 3)
    assert batch["concept_attention_mask"].sum(dim=-1).bool().tolist() == [[True, False, False], [True, True, False]]
    for row, slot, phrase in [(0, 0, "red circle"), (1, 0, "blue square"), (1, 1, "square")]:
        length = int(batch["concept_attention_mask"][row, slot].sum())
        assert batch["concept_input_ids"][row, slot, :length].tolist() == tokenizer(phrase).input_ids
    torch.testing.assert_close(batch["pixel_values"][0], torch.full((3, 32, 32), -1.0))
    with pytest.raises(ValueError, match="concept phrase"):
        collator([{"image": images[0], "concepts": []}])


def test_task_weights_take_or_repeat_each_tasks_records() -> None:
    world = shapes_world(0, 4, 32, tasks=["captions", "text_to_image"])
    examples = chat_examples(world, {"captions": 0.5, "text_to_image": 2})
    captions, drawings = examples[:2], examples[2:]
    assert len(drawings) == 8
    assert [e["messages"][1]["content"] for e in captions] == world["captions"]["caption"][:2]
    assert [e["messages"][0]["content"][-1]["text"] for e in drawings[4:]] == [
        f"Draw {prompt}." for prompt in world["text_to_image"]["prompt"]
    ]
    assert all(e["messages"][1]["content"] == [{"type": "image"}] for e in drawings)  # the answer is an image
    with pytest.raises(ValueError, match="weights"):
        chat_examples(world, {"captions": -1})
    with pytest.raises(ValueError, match="editing"):
        chat_examples(world, {"editing": 1})


def test_spearman_ranks_ties_by_their_mean_rank() -> None:
    # ranks of (1, 2, 2, 3) are (0, 1.5, 1.5, 3); of (10, 30, 20, 40) are (0, 2, 1, 3)
    a, b = np.array([0, 1.5, 1.5, 3]), np.array([0, 2, 1, 3])
    expected = ((a - a.mean()) * (b - b.mean())).sum() / np.sqrt(
        ((a - a.mean()) ** 2).sum() * ((b - b.mean()) ** 2).sum()
    )
    assert spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(expected)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_stage_configs_reject_what_they_cannot_mean(tmp_path: Path) -> None:
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump({"stage": 1, "data": {}, "training": {}, "epochs": 3}))
    with pytest.raises(ValueError, match="epochs"):
        StageConfig.from_file(path)
    path.write_text(yaml.safe_dump({"stage": 4, "data": {}, "training": {}}))
    with pytest.raises(ValueError, match="stage"):
        StageConfig.from_file(path)
    path.write_text(yaml.safe_dump({"stage": 2, "data": {}, "training": {}, "lora": {"r": 4}}))
    with pytest.raises(ValueError, match="lora"):
        StageConfig.from_file(path)
    path.write_text(yaml.safe_dump({"stage": 1, "data": {}, "training": {}, "learning_rates": {"merger": 1e-4}}))
    with pytest.raises(ValueError, match="stage 1 has one rate"):
        StageConfig.from_file(path)
    with pytest.raises(FileNotFoundError, match="tiny"):
        stage_config_path(tmp_path / "nowhere", 1)
    assert stage_config_path("tiny", 2) == RECIPES_DIR / "tiny" / "stage2.yaml"
