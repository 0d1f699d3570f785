"""`setok tokenize`: how a SeTok checkpoint splits images into tokens, and what the set of images costs.

    setok tokenize photos/ "shots/*.jpg" cat.png --model path/to/checkpoint --counts counts.csv

reads every image (folders for their image files, globs expanded), tokenizes them in batches, prints each
image's token count and statistics over the set (the count is what an image costs the language model), writes
`<out>/<image stem>_tokens.png` overlays and, with `--counts`, the counts as JSON or CSV. Files that are no
readable image are skipped and listed at the end. `--model` takes a SeTok folder, or a Setokim folder whose own
SeTok part is used. Without images it uses the bundled samples; without `--model`, a tiny randomly initialised
tokenizer, so the command works before any checkpoint is at hand.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import statistics
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoConfig
from transformers.utils import logging as transformers_logging

from ..configuration_setok import SetokConfig
from ..configuration_setokim import SetokimConfig
from ..image_processing_setok import SetokImageProcessor, load_image
from ..modeling_setok import SetokModel, SetokModelOutput
from ..modeling_setokim import SetokimForConditionalGeneration
from ..visualization import draw_token_regions
from .errors import failure_for

SAMPLE_IMAGE_DIR = Path(__file__).resolve().parent.parent / "sample_images"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
COUNTS_FORMATS = (".json", ".csv")
DEMO_SEED = 1
MIN_DISPLAY_SIDE = 256
MAX_DISPLAY_SIDE = 1024
# The SeTok part inside a saved Setokim: `model.setok.*` (SetokimForConditionalGeneration) or `setok.*` (SetokimModel).
SETOKIM_SETOK_KEYS = r"^(model\.)?setok\."
WHAT_TO_PASS = "pass a SeTok folder (SetokModel.save_pretrained, `setok convert`) or a Setokim folder"


fail = failure_for("tokenize")


def sample_image_paths() -> list[Path]:
    """The bundled 128x128 samples, from simple to busy: `flat.png`, `shapes.png`, `clutter.png`."""
    return [SAMPLE_IMAGE_DIR / name for name in ("flat.png", "shapes.png", "clutter.png")]


def demo_tokenizer() -> tuple[SetokModel, SetokImageProcessor]:
    """A tiny SeTok with random weights (SigLIP-style, 128x128 input, 16x16 patch grid), the same on every call.

    Its encoder is untrained, so its regions follow colour and position rather than meaning; it exists to try
    the tooling without a checkpoint.
    """
    config = SetokConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=128,
            patch_size=8,
        ),
        num_attention_heads=2,
        intermediate_size=64,
        token_size=32,
        cluster_threshold=0.5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        model = SetokModel(config)
    return model.eval(), SetokImageProcessor.for_encoder(config.vision_config)


def image_paths(specs: Sequence[str]) -> list[Path]:
    """Files named on the command line: files as given, folders for their image files, glob patterns expanded."""
    paths: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(child for child in path.iterdir() if child.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                fail(f"folder {spec} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        elif glob.has_magic(spec):
            found = sorted(Path(match) for match in glob.glob(spec, recursive=True) if Path(match).is_file())
            if not found:
                fail(f"no file matches {spec}")
            paths.extend(found)
        else:
            fail(f"image file not found: {spec}")
    return list(dict.fromkeys(paths))


def load_tokenizer(model_path: str | None) -> tuple[SetokModel, SetokImageProcessor]:
    """The SeTok at `model_path` (a SeTok or Setokim folder, or Hub id) with its image processor, or the demo one."""
    if model_path is None:
        print(
            "warning: no --model given; using a tiny SeTok with untrained random weights (seed "
            f"{DEMO_SEED}), so its token regions only illustrate the tool",
            file=sys.stderr,
        )
        return demo_tokenizer()
    model = load_setok(model_path)
    try:
        processor = SetokImageProcessor.from_pretrained(model_path)
    except OSError:
        processor = SetokImageProcessor.for_encoder(model.config.vision_config)
        print(
            f"warning: {model_path} has no image processor config; resizing images to "
            f"{processor.size.height}x{processor.size.width} with SigLIP normalisation",
            file=sys.stderr,
        )
    return model, processor


def load_setok(model_path: str) -> SetokModel:
    """The trained SeTok of a SeTok folder, or the SeTok part of a Setokim folder; every weight must load."""
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        fail(f"--model {model_path} is no checkpoint folder here nor a model id the Hub could give; {WHAT_TO_PASS}")
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()  # the load report is replaced by the check below
    transformers_logging.disable_progress_bar()
    try:
        if config.model_type == "setok":
            model, info = SetokModel.from_pretrained(model_path, output_loading_info=True)
            other_parts: set[str] = set()
        elif config.model_type == "setokim":
            model, info = SetokModel.from_pretrained(
                model_path,
                config=config.setok_config,
                key_mapping={SETOKIM_SETOK_KEYS: ""},
                output_loading_info=True,
            )
            other_parts = setokim_keys_outside_setok(config)
        else:
            fail(
                f"--model {model_path} is a {config.model_type} model, not a SeTok: a bare vision encoder has no "
                f"trained token merger; {WHAT_TO_PASS}, or build one with `setok compose --vision {model_path} ...`"
            )
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
    missing = info["missing_keys"]
    unexpected = [key for key in info["unexpected_keys"] if key.removeprefix("model.") not in other_parts]
    mismatched = [key for key, *_ in info["mismatched_keys"]]
    problems = [
        f"{len(keys)} {what} (e.g. {sorted(keys)[0]})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
        if keys
    ]
    if problems:
        fail(
            f"--model {model_path} does not hold a complete {config.model_type} checkpoint: weights "
            f"{', '.join(problems)}; refusing to tokenize with random weights; {WHAT_TO_PASS} written by this package"
        )
    return model.eval()


def setokim_keys_outside_setok(config: SetokimConfig) -> set[str]:
    """Weight names (without the `model.` prefix) of a Setokim's parts other than its SeTok: LLM, projector, head."""
    with torch.device("meta"):
        model = SetokimForConditionalGeneration(config)
    names = {name.removeprefix("model.") for name in model.state_dict()}
    return {name for name in names if not name.startswith("setok.")}


def resolve_device(name: str | None) -> torch.device:
    """`--device`, by default the GPU when there is one; a device this machine lacks is a one-line error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        fail(f"--device {name}: {str(error).splitlines()[0]}; pass --device cpu or a device this machine has")
    return device


def batched(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    """Consecutive runs of `size` items, the last one shorter."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def display_size(size: tuple[int, int]) -> tuple[int, int]:
    """`(width, height)` scaled so the shorter side is at least 256 px and the longer at most 1024 px."""
    scale = max(MIN_DISPLAY_SIDE / min(size), 1.0)
    scale = min(scale, MAX_DISPLAY_SIDE / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def tokenize_batch(
    model: SetokModel, processor: SetokImageProcessor, images: list[Image.Image], args: argparse.Namespace
) -> SetokModelOutput:
    """One forward pass with the command's clustering knobs; a setting the model refuses is a one-line error."""
    try:
        pixel_values = processor(images, return_tensors="pt").pixel_values.to(model.device, model.dtype)
        with torch.inference_mode():
            return model(
                pixel_values,
                cluster_threshold=args.threshold,
                min_tokens=args.min_tokens,
                max_tokens=args.max_tokens,
                cluster_k=args.cluster_k,
            )
    except ValueError as error:
        fail(str(error))


def write_counts(counts: dict[str, int], target: Path) -> None:
    """`{image path: token count}` as a JSON object, or a CSV table with the columns `path,num_tokens`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix.lower() == ".json":
        target.write_text(json.dumps(counts, indent=2) + "\n")
        return
    with target.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "num_tokens"])
        writer.writerows(counts.items())


def count_statistics(counts: Sequence[int]) -> str:
    images = f"{len(counts)} image" if len(counts) == 1 else f"{len(counts)} images"
    return (
        f"{images}: {statistics.mean(counts):.1f} tokens per image on average (median {statistics.median(counts):g}, "
        f"min {min(counts)}, max {max(counts)}), {sum(counts)} in all"
    )


def run(args: argparse.Namespace) -> int:
    """Tokenize the images batch by batch; print counts and statistics, write overlays and the counts file."""
    if args.counts is not None and args.counts.suffix.lower() not in COUNTS_FORMATS:
        fail(f"--counts {args.counts}: name a .json or .csv file")
    paths = image_paths(args.images) if args.images else sample_image_paths()
    clashes = sorted(stem for stem, count in Counter(path.stem for path in paths).items() if count > 1)
    if clashes and not args.no_overlays:
        fail(
            f"several images are named {', '.join(clashes)}; their overlays would overwrite each other: run them "
            "separately or pass --no-overlays"
        )
    device = resolve_device(args.device)
    model, processor = load_tokenizer(args.model)
    model.to(device)
    if not args.no_overlays:
        args.out.mkdir(parents=True, exist_ok=True)

    counts: dict[str, int] = {}
    skipped: dict[Path, str] = {}
    with tqdm(total=len(paths), desc="tokenizing", unit="image", disable=None) as progress:
        for batch in batched(paths, args.batch_size):
            images = {}
            for path in batch:
                try:
                    images[path] = load_image(path)
                except (OSError, ValueError, Image.DecompressionBombError) as error:  # no image, truncated, huge
                    skipped[path] = str(error).splitlines()[0] if str(error) else type(error).__name__
            if images:
                outputs = tokenize_batch(model, processor, list(images.values()), args)
                for (path, image), count, assignment, centers in zip(
                    images.items(), outputs.num_tokens.tolist(), outputs.assignment, outputs.centers
                ):
                    counts[str(path)] = count
                    line = f"{path}: {count} {'token' if count == 1 else 'tokens'}"
                    if not args.no_overlays:
                        target = args.out / f"{path.stem}_tokens.png"
                        display = image.resize(display_size(image.size), Image.Resampling.BICUBIC)
                        draw_token_regions(display, assignment, outputs.grid_size, centers).save(target)
                        line += f" -> {target}"
                    tqdm.write(line)
            progress.update(len(batch))

    if skipped:
        print(f"skipped {len(skipped)} of {len(paths)} files, which are no readable image:", file=sys.stderr)
        for path, reason in skipped.items():
            print(f"  {path}: {reason}", file=sys.stderr)
    if not counts:
        fail("none of the files is a readable image")
    print(count_statistics(list(counts.values())))
    if args.counts is not None:
        write_counts(counts, args.counts)
        print(f"counts written to {args.counts}")
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "tokenize",
        help="split images into SeTok tokens, count them and draw each token's region",
        description="Tokenize images in batches, print each image's token count and statistics over the set, and "
        "write <out>/<image stem>_tokens.png overlays showing every token's region and centre.",
    )
    parser.add_argument(
        "images",
        nargs="*",
        help="image files, folders of images or glob patterns such as 'photos/**/*.jpg' "
        "(default: the bundled sample images)",
    )
    parser.add_argument(
        "--model",
        help="SeTok or Setokim checkpoint folder or Hub id (default: a tiny tokenizer with untrained weights)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("overlays"), help="folder for the overlays (default: %(default)s)"
    )
    parser.add_argument("--no-overlays", action="store_true", help="only count tokens; write no overlays")
    parser.add_argument("--counts", type=Path, help="write the token counts to this .json or .csv file")
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="images per forward pass (default: %(default)s)"
    )
    parser.add_argument("--device", help="device to run on, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument(
        "--threshold",
        type=float,
        help="density-peak score a patch needs to become a token centre; higher gives fewer tokens "
        "(default: the checkpoint's cluster_threshold)",
    )
    parser.add_argument(
        "--min-tokens", type=int, help="fewest tokens per image (default: the checkpoint's min_tokens)"
    )
    parser.add_argument("--max-tokens", type=int, help="most tokens per image (default: the checkpoint's max_tokens)")
    parser.add_argument(
        "--cluster-k", type=int, help="neighbours of the density estimate (default: the checkpoint's cluster_k)"
    )
    parser.set_defaults(handler=run)
