"""The `setok` command: see how a SeTok checkpoint splits images into tokens.

    setok tokenize photo.png other.jpg --out overlays/ --model path/to/checkpoint

writes `overlays/photo_tokens.png` and `overlays/other_tokens.png`, each image tinted by token region, and
prints every image's token count. Without images it uses the bundled samples; without `--model` it uses a
tiny randomly initialised tokenizer, so the command works before any checkpoint is at hand.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .configuration_setok import SetokConfig
from .image_processing_setok import SetokImageProcessor
from .modeling_setok import SetokModel
from .visualization import draw_token_regions

SAMPLE_IMAGE_DIR = Path(__file__).parent / "sample_images"
DEMO_SEED = 1
MIN_DISPLAY_SIDE = 256
MAX_DISPLAY_SIDE = 1024


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


def load_tokenizer(model_path: str | None) -> tuple[SetokModel, SetokImageProcessor]:
    """The checkpoint at `model_path` (a folder or Hub id) with its image processor, or the demo tokenizer."""
    if model_path is None:
        print(
            "warning: no --model given; using a tiny SeTok with untrained random weights (seed "
            f"{DEMO_SEED}), so its token regions only illustrate the tool",
            file=sys.stderr,
        )
        return demo_tokenizer()
    model = SetokModel.from_pretrained(model_path).eval()
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


def open_image(path: Path) -> Image.Image:
    """Read an image as RGB, upright as its EXIF orientation says; exit with a message naming a bad path."""
    if not path.is_file():
        raise SystemExit(f"setok tokenize: error: image file not found: {path}")
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except OSError as error:  # PIL raises UnidentifiedImageError, an OSError, for files that are no image
        raise SystemExit(f"setok tokenize: error: cannot read {path} as an image ({error})") from error


def display_size(size: tuple[int, int]) -> tuple[int, int]:
    """`(width, height)` scaled so the shorter side is at least 256 px and the longer at most 1024 px."""
    scale = max(MIN_DISPLAY_SIDE / min(size), 1.0)
    scale = min(scale, MAX_DISPLAY_SIDE / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def tokenize(args: argparse.Namespace) -> None:
    """Tokenize every image in one batch, print its token count and write its region overlay."""
    paths = [Path(path) for path in args.images] if args.images else sample_image_paths()
    clashes = sorted(stem for stem, count in Counter(path.stem for path in paths).items() if count > 1)
    if clashes:
        raise SystemExit(
            f"setok tokenize: error: several images are named {', '.join(clashes)}; their overlays would overwrite "
            "each other, so run them separately"
        )
    images = [open_image(path) for path in paths]
    model, processor = load_tokenizer(args.model)
    if torch.cuda.is_available():
        model = model.to("cuda")

    try:
        pixel_values = processor(images, return_tensors="pt").pixel_values.to(model.device, model.dtype)
        with torch.inference_mode():
            outputs = model(
                pixel_values,
                cluster_threshold=args.threshold,
                min_tokens=args.min_tokens,
                max_tokens=args.max_tokens,
            )
    except ValueError as error:
        raise SystemExit(f"setok tokenize: error: {error}") from error

    args.out.mkdir(parents=True, exist_ok=True)
    for path, image, count, assignment in zip(paths, images, outputs.num_tokens.tolist(), outputs.assignment):
        overlay = draw_token_regions(
            image.resize(display_size(image.size), Image.Resampling.BICUBIC), assignment, outputs.grid_size
        )
        target = args.out / f"{path.stem}_tokens.png"
        overlay.save(target)
        print(f"{path}: {count} {'token' if count == 1 else 'tokens'} -> {target}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="setok", description="SeTok semantic vision tokenizer tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tokenize_parser = commands.add_parser(
        "tokenize",
        help="split images into SeTok tokens and draw each token's region",
        description="Tokenize images in one batch, print each image's token count and write "
        "<out>/<image stem>_tokens.png overlays showing every token's region.",
    )
    tokenize_parser.add_argument(
        "images", nargs="*", help="image files to tokenize (default: the bundled sample images)"
    )
    tokenize_parser.add_argument(
        "--out", type=Path, default=Path("overlays"), help="folder for the overlays (default: %(default)s)"
    )
    tokenize_parser.add_argument(
        "--model",
        help="SeTok checkpoint folder or Hub id (default: a tiny tokenizer with untrained weights)",
    )
    tokenize_parser.add_argument(
        "--threshold",
        type=float,
        help="density-peak score a patch needs to become a token centre; higher gives fewer tokens "
        "(default: the checkpoint's cluster_threshold)",
    )
    tokenize_parser.add_argument(
        "--min-tokens", type=int, help="fewest tokens per image (default: the checkpoint's min_tokens)"
    )
    tokenize_parser.add_argument(
        "--max-tokens", type=int, help="most tokens per image (default: the checkpoint's max_tokens)"
    )
    tokenize_parser.set_defaults(handler=tokenize)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `setok` console script."""
    args = build_parser().parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
