"""The shipped recipes checked without training: `setok train --dry-run` sizes every stage of the paper and tiny
recipes on the meta device (counts checked against closed-form parameter counts of SigLIP so400m, Vicuna-7B, BERT
and LoRA), rejects misspelt keys and launcher configs that do not fit a stage; and stage 1 trains with two
processes (torchrun and `accelerate launch` with the shipped multi_cpu.yaml) as one DDP job."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from test_distributed_pretraining import LAUNCHERS, free_port
from test_recipe_stages import micro_recipe
from transformers import AutoTokenizer

from transformers_setok import SetokForPreTraining
from transformers_setok.cli import main
from transformers_setok.recipes import STAGES, StageConfig, stage_config_path, train_stage
from transformers_setok.recipes.dry_run import ACCELERATE_DIR, StagePlan, dry_run, format_report

IMAGE_MARKERS = 3  # [Img], [/Img], <image>


def linear(inputs: int, outputs: int) -> int:
    return inputs * outputs + outputs


def siglip_vision_parameters(hidden: int, intermediate: int, layers: int, image_size: int, patch_size: int) -> int:
    """A SigLIP vision tower: patch and position embeddings, pre-norm layers, final norm, attention-pooling head."""
    mlp = linear(hidden, intermediate) + linear(intermediate, hidden)
    embeddings = 3 * patch_size**2 * hidden + hidden + (image_size // patch_size) ** 2 * hidden
    layer = 2 * 2 * hidden + 4 * linear(hidden, hidden) + mlp
    head = hidden + 3 * linear(hidden, hidden) + linear(hidden, hidden) + 2 * hidden + mlp
    return embeddings + layers * layer + 2 * hidden + head


def llama_parameters(vocab: int, hidden: int, intermediate: int, layers: int, tied: bool) -> int:
    """A Llama with as many key/value heads as heads: embeddings, layers (attention, SwiGLU MLP, two RMSNorms),
    final norm, LM head."""
    layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * layer + hidden


def bert_parameters(vocab: int, hidden: int, intermediate: int, layers: int, positions: int) -> int:
    """A BERT with its pooler: word, position and 2 token-type embeddings, post-norm layers."""
    layer = 4 * linear(hidden, hidden) + linear(hidden, intermediate) + linear(intermediate, hidden) + 4 * hidden
    return (vocab + positions + 2) * hidden + 2 * hidden + layers * layer + linear(hidden, hidden)


def lora_parameters(rank: int, hidden: int, intermediate: int, layers: int) -> int:
    """LoRA on q/k/v/o (hidden -> hidden) and gate/up (hidden -> intermediate), down (back): `rank * (in + out)`."""
    return layers * rank * (4 * 2 * hidden + 3 * (hidden + intermediate))


def mlp2x_parameters(inputs: int, hidden: int) -> int:
    return linear(inputs, hidden) + linear(hidden, hidden)


@pytest.fixture(scope="module")
def paper_plans(tmp_path_factory: pytest.TempPathFactory) -> dict[int, StagePlan]:
    """The paper recipe's stages: stage 1 launched with ZeRO-2, stages 2 and 3 with FSDP."""
    out = tmp_path_factory.mktemp("paper")
    plans = dry_run("paper", [1], out, "zero2") + dry_run("paper", [2, 3], out, "fsdp")
    return {plan.stage: plan for plan in plans}


def test_paper_stage1_freezes_siglip_so400m_and_the_phrase_encoder(paper_plans: dict[int, StagePlan]) -> None:
    plan = paper_plans[1]
    so400m = siglip_vision_parameters(1152, 4304, 27, 384, 14)
    assert so400m == 428_225_600  # the published ~0.43B vision tower
    assert (plan.parts["vision_encoder"].trainable, plan.parts["vision_encoder"].total) == (0, so400m)
    bert_base = bert_parameters(30522, 768, 3072, 12, 512)
    assert (plan.parts["phrase_encoder"].trainable, plan.parts["phrase_encoder"].total) == (0, bert_base)
    assert plan.parts["concept_projection"].trainable == 768 * 4096 + 4096 + 1  # projection and temperature
    assert plan.parts["merger"].frozen == 0 and plan.parts["merger"].total > 0
    # the VAE is frozen; the U-Net and the token conditioning train
    assert plan.parts["detokenizer"].frozen == 83_653_863 and plan.parts["detokenizer"].trainable > 8e8
    assert (plan.world_size, plan.global_batch_size, plan.steps, plan.examples) == (8, 24 * 8, None, None)
    assert plan.data_note == "data.train_files: 2 of 2 files not found here"
    assert plan.arguments.bf16 and plan.arguments.learning_rate == 1e-3 and plan.arguments.warmup_steps == 0.03
    assert plan.launch.sharding == "DeepSpeed ZeRO-2"
    deepspeed_missing = "deepspeed is not installed here: its settings were read, not run (pip install deepspeed)"
    assert (deepspeed_missing in plan.launch.notes) == (importlib.util.find_spec("deepspeed") is None)


def test_paper_stage2_trains_the_projectors_of_a_frozen_vicuna_7b(paper_plans: dict[int, StagePlan]) -> None:
    plan = paper_plans[2]
    vicuna = llama_parameters(32000 + IMAGE_MARKERS, 4096, 11008, 32, tied=False)
    assert llama_parameters(32000, 4096, 11008, 32, tied=False) == 6_738_415_616  # LLaMA-7B's published size
    assert (plan.parts["language_model"].trainable, plan.parts["language_model"].total) == (0, vicuna)
    projector = mlp2x_parameters(4096, 4096)
    trainable = {name: size.trainable for name, size in plan.parts.items() if size.trainable}
    assert trainable == {"projector": projector, "vision_head": projector}
    assert plan.parts["vision_encoder"].frozen == siglip_vision_parameters(1152, 4304, 27, 384, 14)
    assert plan.total.total == sum(size.total for size in plan.parts.values())
    assert (plan.world_size, plan.global_batch_size, plan.steps) == (8, 32 * 8, None)
    assert plan.launch.sharding == "FSDP1 FULL_SHARD, one unit per LlamaDecoderLayer (32)"
    assert plan.arguments.activation_checkpointing and plan.start == "on the model of paper/stage1.yaml"


def test_paper_stage3_trains_lora_on_every_linear_layer_of_the_llm(paper_plans: dict[int, StagePlan]) -> None:
    plan = paper_plans[3]
    lora = lora_parameters(128, 4096, 11008, 32)
    assert lora == 319_815_680
    language_model = plan.parts["language_model"]
    vicuna = llama_parameters(32000 + IMAGE_MARKERS, 4096, 11008, 32, tied=False)
    assert (language_model.trainable, language_model.frozen) == (lora, vicuna)
    # modules_to_save: a trained copy beside each frozen original
    projector = mlp2x_parameters(4096, 4096)
    for part, size in (("projector", projector), ("vision_head", projector)):
        assert (plan.parts[part].trainable, plan.parts[part].frozen) == (size, size)
    assert plan.parts["mask_decoder"].trainable == plan.parts["mask_decoder"].frozen > 0
    assert plan.parts["vision_encoder"].trainable == plan.parts["merger"].trainable == 0
    assert plan.start == "on the model of paper/stage2.yaml"


def test_tiny_recipe_plans_for_the_multi_cpu_launcher(tmp_path: Path) -> None:
    plans = dry_run("tiny", STAGES, tmp_path, "multi_cpu")
    configs = {stage: StageConfig.from_file(stage_config_path("tiny", stage)) for stage in STAGES}
    for plan in plans:
        training = configs[plan.stage].training
        assert (plan.world_size, plan.steps) == (2, training["max_steps"])
        assert plan.global_batch_size == 2 * training["per_device_train_batch_size"]
        assert plan.launch.sharding == "DDP over gloo on the CPU"
    stage1, stage2, stage3 = plans
    assert stage1.total.frozen == 0  # nothing pretrained to freeze: everything learns from scratch
    for part, enabled in configs[2].trainable.items():  # no adapters: a part trains in full or not at all
        size = stage2.parts[part]
        assert (size.trainable, size.frozen) == ((size.total, 0) if enabled else (0, size.total)), part
    text = configs[2].model["text_config"]
    lora = configs[3].lora
    assert set(lora["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    expected = lora_parameters(lora["r"], text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"])
    assert stage3.parts["language_model"].trainable == expected
    sizes = (text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"])
    language_model = llama_parameters(512 + IMAGE_MARKERS, *sizes, tied=text["tie_word_embeddings"])
    assert stage3.parts["language_model"].frozen == language_model == stage2.parts["language_model"].total


def test_ddp_looks_for_unused_parameters_where_a_batch_may_leave_a_trained_part_out(tmp_path: Path) -> None:
    plans = {plan.stage: plan for plan in dry_run("tiny", STAGES, tmp_path / "run")}
    # stage 1's batches reach every part; the Trainer's default stays
    assert plans[1].arguments.ddp_find_unused_parameters is None
    assert plans[2].arguments.ddp_find_unused_parameters and plans[3].arguments.ddp_find_unused_parameters
    folder = recipe_copy(tmp_path, "tiny")
    edit(folder, 2, setting("training", "ddp_find_unused_parameters", value=False))  # the YAML's choice wins
    (plan,) = dry_run(folder, [2], tmp_path / "run")
    assert plan.arguments.ddp_find_unused_parameters is False
    only_the_language_model = {part: part == "language_model" for part in plans[2].parts}
    edit(
        folder,
        2,
        lambda c: (c["training"].pop("ddp_find_unused_parameters"), c.update(trainable=only_the_language_model)),
    )
    (plan,) = dry_run(folder, [2], tmp_path / "run")
    assert plan.arguments.ddp_find_unused_parameters is None


def test_the_report_prints_every_part_and_the_launcher(paper_plans: dict[int, StagePlan]) -> None:
    lines = format_report([paper_plans[2]]).splitlines()
    assert lines[0] == "stage 2: SetokimForConditionalGeneration, paper/stage2.yaml, on the model of paper/stage1.yaml"
    assert lines[5] == "  language_model                    0   6,738,440,192"
    assert lines[-4:] == [
        "  steps: 1 epoch of examples not counted here",
        "  data: data.train_files: 2 of 2 files not found here",
        "  precision: bf16, learning rate 0.001, cosine",
        "  launch: accelerate/fsdp.yaml: FSDP1 FULL_SHARD, one unit per LlamaDecoderLayer (32); 8 processes on 1 "
        "machine",
    ]
    # stage 3's projector at the official --mm_projector_lr, beside the rest's rate
    assert "  precision: bf16, learning rate 0.001, projector 2e-05, cosine" in format_report([paper_plans[3]])


def test_steps_count_the_records_of_local_train_files(tmp_path: Path) -> None:
    records = tmp_path / "captions.jsonl"
    records.write_text("".join(json.dumps({"image": f"{i}.png", "concepts": ["a dog"]}) + "\n" for i in range(100)))
    folder = recipe_copy(tmp_path, "paper")
    edit(folder, 1, lambda c: c["data"].update(train_files=[str(records)]))
    (plan,) = dry_run(folder, [1], tmp_path / "run", "zero2")
    # 100 records in batches of 24: 5 batches, every 8th for each of 8 processes -> 1 step per process and epoch
    assert (plan.examples, plan.steps, plan.data_note) == (100, 1, "data.train_files, 1 file")
    (single,) = dry_run(folder, [1], tmp_path / "run")
    assert (single.world_size, single.steps) == (1, 5)


def recipe_copy(tmp_path: Path, recipe: str) -> Path:
    folder = tmp_path / f"{recipe}-copy"
    folder.mkdir()
    for stage in STAGES:
        (folder / f"stage{stage}.yaml").write_text(stage_config_path(recipe, stage).read_text())
    return folder


def edit(folder: Path, stage: int, change: Callable[[dict], object]) -> None:
    path = folder / f"stage{stage}.yaml"
    values = yaml.safe_load(path.read_text())
    change(values)
    path.write_text(yaml.safe_dump(values))


def launcher_copy(tmp_path: Path, name: str, change: Callable[[dict], object]) -> Path:
    values = yaml.safe_load((ACCELERATE_DIR / f"{name}.yaml").read_text())
    change(values)
    path = tmp_path / f"{name}-edited.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def setting(*keys: str, value: object = None, remove: bool = False) -> Callable[[dict], None]:
    """A change to a config: `keys` (a path into it) set to `value`, or removed."""

    def change(values: dict) -> None:
        for key in keys[:-1]:
            values = values[key]
        if remove:
            del values[keys[-1]]
        else:
            values[keys[-1]] = value

    return change


BAD_STAGES = [
    pytest.param("tiny", 1, setting("data", "train_file", value="x.jsonl"), r"data: unknown keys \['train_file'\]"),
    pytest.param(
        "tiny",
        1,
        setting("model", "setok_config", "vision_config", "hiden_size", value=8),
        r"model\.setok_config\.vision_config: unknown keys \['hiden_size'\]",
    ),
    pytest.param(
        "tiny",
        1,
        setting("model", "detokenizer_config", "unet_config", "block_out", value=[8]),
        r"model\.detokenizer_config\.unet_config: unknown keys \['block_out'\]",
    ),
    pytest.param("tiny", 2, setting("training", "learning_rat", value=1.0), r"training: .*'learning_rat'"),
    pytest.param("tiny", 2, setting("epochs", value=1), r"unknown keys \['epochs'\]"),
    pytest.param("tiny", 2, setting("trainable", "vision_tower", value=True), r"trainable: unknown keys"),
    pytest.param("tiny", 2, setting("model", "mask_weight", value=1.0), r"model: unknown keys \['mask_weight'\]"),
    pytest.param("tiny", 3, setting("lora", "rank", value=4), r"stage3\.yaml: lora: .*'rank'"),
    pytest.param(
        "tiny",
        3,
        setting("learning_rates", value={"vision_tower": 1e-4}),
        r"learning_rates: unknown keys \['vision_tower'\]",
    ),
    pytest.param(
        "tiny",
        3,
        setting("learning_rates", value={"merger": 1e-4}),  # the tiny recipe's stage 3 keeps the merger frozen
        r"stage3\.yaml: learning_rates: learning_rates names \['merger'\], which train no parameter here",
    ),
    pytest.param(
        "tiny",
        3,
        setting("trainable", "vision_encoder", value=True),  # without `setok` in lora.modules_to_save
        r"stage3\.yaml: trainable parts \['vision_encoder'\] train outside the LoRA adapters",
    ),
    pytest.param("tiny", 3, setting("model", value={"projector_type": "linear"}), r"starts from stage 2's model"),
    pytest.param("tiny", 2, setting("stage", value=3), r"says stage 3, but it is the recipe's stage2\.yaml"),
    pytest.param(
        "tiny",
        1,
        setting("training", "activation_checkpointing", value=True),
        r"SetokForPreTraining does not support activation checkpointing",
    ),
    pytest.param(
        "paper",
        1,
        setting("model", "setok_config", "vision_config", remove=True),
        r"model\.vision_model \(google/siglip-so400m-patch14-384\) is not downloaded in a dry run",
    ),
    pytest.param(
        "paper",
        1,
        setting("model", "detokenizer_config", "unet_config", remove=True),
        r"model\.detokenizer_model \(stable-diffusion-v1-5/stable-diffusion-v1-5\) is not downloaded in a dry run",
    ),
    pytest.param(
        "paper",
        2,
        setting("model", "text_config", remove=True),
        r"model\.text_config is needed: the architecture of lmsys/vicuna-7b-v1\.5",
    ),
]


@pytest.mark.parametrize(("recipe", "stage", "change", "message"), BAD_STAGES)
def test_bad_stage_configs_name_the_file_and_key(recipe, stage, change, message, tmp_path: Path) -> None:
    folder = recipe_copy(tmp_path, recipe)
    edit(folder, stage, change)
    with pytest.raises(ValueError, match=message):
        dry_run(folder, [stage], tmp_path / "run")


def test_missing_stage_files_say_which(tmp_path: Path) -> None:
    folder = recipe_copy(tmp_path, "tiny")
    (folder / "stage2.yaml").unlink()
    with pytest.raises(FileNotFoundError, match=r"no stage2\.yaml in .*tiny-copy"):
        dry_run(folder, [2], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"stage 3 starts from stage 2's model, which .*stage2 does not hold"):
        dry_run(folder, [3], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"no accelerate config 'fsdp2'; give a file or one of \['fsdp', "):
        dry_run(folder, [1], tmp_path / "run", "fsdp2")


BAD_LAUNCHERS = [
    pytest.param(
        "paper",
        1,
        "fsdp",
        setting("use_cpu", value=False),
        r"names \['LlamaDecoderLayer'\], which stage 1's model does not have \(its layer classes: \['BertLayer', ",
        id="no Llama layers in stage 1",
    ),
    pytest.param(
        "tiny",
        2,
        "multi_cpu",
        setting("mixed_precision", value="bf16"),
        r"mixed_precision is 'bf16' but stage 2 trains with 'no'",
        id="precision",
    ),
    pytest.param(
        "paper",
        2,
        "fsdp",
        setting("fsdp_config", "fsdp_use_orig_params", value=False),
        r"fsdp_use_orig_params is off, but stage 2 trains some parameters and freezes others",
        id="flat parameters",
    ),
    pytest.param(
        "paper",
        2,
        "fsdp",
        setting("fsdp_config", "fsdp_activation_checkpointing", value=True),
        r"fsdp_activation_checkpointing and the stage's training\.activation_checkpointing are both on",
        id="checkpointing twice",
    ),
    pytest.param(
        "tiny",
        1,
        "multi_cpu",
        setting("distributed_type", value="MULTI_CPU"),
        r"through mpirun only",
        id="MULTI_CPU without mpirun",
    ),
    pytest.param(
        "paper",
        2,
        "fsdp",
        setting("fsdp_config", "fsdp_wrap_everything", value=True),
        r"fsdp_config: unknown keys \['fsdp_wrap_everything'\]",
        id="misspelt FSDP key",
    ),
    pytest.param(
        "paper",
        1,
        "zero2",
        setting("deepspeed_config", "gradient_accumulation_steps", value=4),
        r"deepspeed gradient_accumulation_steps is 4 but stage 1's TrainingArguments say 1",
        id="ZeRO accumulation",
    ),
    pytest.param(
        "tiny",
        1,
        "multi_cpu",
        setting("distributed_typ", value="MULTI_GPU"),
        r"not an accelerate config",
        id="not a launcher config",
    ),
]


@pytest.mark.parametrize(("recipe", "stage", "name", "change", "message"), BAD_LAUNCHERS)
def test_launcher_configs_that_do_not_fit_a_stage_are_refused(recipe, stage, name, change, message, tmp_path) -> None:
    with pytest.raises(ValueError, match=message):
        dry_run(recipe, [stage], tmp_path / "run", launcher_copy(tmp_path, name, change))


def test_a_deepspeed_json_file_is_read_without_deepspeed(tmp_path: Path) -> None:
    # the official scripts/zero2.json: every batch and precision setting "auto"
    official = {
        "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
    }
    file = tmp_path / "zero2.json"
    file.write_text(json.dumps(official))
    launcher = launcher_copy(
        tmp_path, "zero2", setting("deepspeed_config", value={"deepspeed_config_file": str(file)})
    )
    (plan,) = dry_run("paper", [1], tmp_path / "run", launcher)
    assert (plan.launch.sharding, plan.global_batch_size) == ("DeepSpeed ZeRO-2", 24 * 8)
    file.write_text(json.dumps({**official, "bf16": {"enabled": False}, "train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(
        ValueError, match=r"bf16\.enabled is False but training\.bf16 is True; .*micro_batch_size_per_gpu is 16"
    ):
        dry_run("paper", [1], tmp_path / "run", launcher)


def test_setok_train_dry_run_prints_the_report_or_one_line_error(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--dry-run", "--stage", "1", "--accelerate-config", "multi_cpu", "--out", str(out)]) == 0
    expected = format_report(dry_run("tiny", [1], out, "multi_cpu"))
    assert capsys.readouterr().out == expected + "\n"
    assert not out.exists()  # nothing written
    with pytest.raises(SystemExit, match=r"^setok train: error: .*fsdp\.yaml does not fit stage 1: [^\n]*$"):
        main(["train", "--dry-run", "--stage", "1", "--accelerate-config", "fsdp", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"--accelerate-config is checked by --dry-run; to train with it, launch"):
        main(["train", "--stage", "1", "--accelerate-config", "fsdp", "--out", str(out)])


def accelerate_multi_cpu() -> list[str]:
    config = str(ACCELERATE_DIR / "multi_cpu.yaml")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--main_process_port"] + [
        str(free_port())
    ]


MULTI_PROCESS = {"torchrun": LAUNCHERS["torchrun"], "accelerate multi_cpu.yaml": accelerate_multi_cpu}
# `setok train` with `Trainer.save_model` recording, per process, the folders it is asked to save to (FSDP and
# DeepSpeed gather the weights there, so every process must call it).
RECORDING_CLI = """
import os
import sys
from pathlib import Path

from transformers import Trainer

from transformers_setok.cli import main

save_model = Trainer.save_model


def recording_save_model(self, output_dir=None, _internal_call=False):
    if not _internal_call:  # not the Trainer's own checkpoints
        with open(Path(os.environ["SAVE_MODEL_CALLS"]) / f"rank{os.environ['RANK']}", "a") as calls:
            calls.write(f"{output_dir}\\n")
    save_model(self, output_dir, _internal_call)


Trainer.save_model = recording_save_model
sys.exit(main(sys.argv[1:]))
"""


def run_recording_cli(launcher: list[str], arguments: list[str], tmp_path: Path) -> dict[str, list[str]]:
    """`setok train arguments` under `launcher`; the folders each process's `save_model` was called with."""
    script, calls = tmp_path / "recording_cli.py", tmp_path / "save_model_calls"
    script.write_text(RECORDING_CLI)
    calls.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "SAVE_MODEL_CALLS": str(calls)}
    result = subprocess.run(
        [*launcher, str(script), "train", *arguments], capture_output=True, text=True, env=env, timeout=1200
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {path.name: path.read_text().split() for path in calls.iterdir()}


@pytest.mark.parametrize("launcher", list(MULTI_PROCESS))
def test_stage1_trains_as_one_job_of_two_cpu_processes(launcher: str, tmp_path: Path) -> None:
    recipe, out = micro_recipe(tmp_path / "recipe"), tmp_path / "run"
    arguments = ["--stage", "1", "--recipe", str(recipe), "--out", str(out)]
    calls = run_recording_cli(MULTI_PROCESS[launcher](), arguments, tmp_path)
    assert calls == {"rank0": [str(out / "stage1")], "rank1": [str(out / "stage1")]}
    log = json.loads((out / "stage1" / "training_log.json").read_text())
    # 6 scenes, 2 per process and step: two processes sharing the data finish the epoch in 2 steps; two processes
    # each training alone on all of it would be 2/3 of the way through theirs
    assert (log[-1]["step"], log[-1]["epoch"]) == (2, 1.0)
    model = SetokForPreTraining.from_pretrained(out / "stage1")
    # the saved model is the one trained: the weights of the Trainer's checkpoint of the last step
    trained = SetokForPreTraining.from_pretrained(out / "stage1" / "checkpoints" / "checkpoint-2").state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert model.config.text_config.vocab_size == len(tokenizer) == 400
    # the dry run's meta-device model is the recipe's: same parameters, and the trained stage 1 is what stage 2
    # would start from
    (plan,) = dry_run(recipe, [1], out)
    assert plan.total.total == plan.total.trainable == sum(p.numel() for p in model.parameters())
    (stage2,) = dry_run(recipe, [2], out)
    assert stage2.start == f"on the trained model in {out / 'stage1'}"
    text = yaml.safe_load((recipe / "stage2.yaml").read_text())["model"]["text_config"]
    sizes = (text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"])
    expected = llama_parameters(400 + IMAGE_MARKERS, *sizes, tied=text.get("tie_word_embeddings", False))
    assert stage2.parts["language_model"].total == expected


def test_stage2_trains_in_two_cpu_processes_on_batches_that_leave_the_vision_head_unused(tmp_path: Path) -> None:
    """Captions alone never reach the vision head. DDP must look for parameters without a gradient, which the
    `Trainer` does not ask of a model with activation checkpointing (as the paper's stages 2 and 3 have)."""
    recipe, out = micro_recipe(tmp_path / "recipe"), tmp_path / "run"
    train_stage(StageConfig.from_file(recipe / "stage1.yaml"), out)
    edit(
        recipe,
        2,
        lambda c: (c["data"].update(tasks={"captions": 1}), c["training"].update(activation_checkpointing=True)),
    )
    arguments = ["--stage", "2", "--recipe", str(recipe), "--out", str(out)]
    calls = run_recording_cli(LAUNCHERS["torchrun"](), arguments, tmp_path)
    assert calls == {"rank0": [str(out / "stage2")], "rank1": [str(out / "stage2")]}
    log = json.loads((out / "stage2" / "training_log.json").read_text())
    assert log[-1]["step"] == 2
