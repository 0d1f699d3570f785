"""`setok reconstruct`: how much of an image its SeTok tokens keep, seen by redrawing it from them.

    setok reconstruct photo.png --model path/to/setok --out recon/

tokenizes each image with a `SetokForPreTraining` checkpoint (tokenizer + detokenizer), samples an image from
its tokens with the detokenizer pipeline and writes `<out>/<image stem>_reconstruction.png`: the original (at
the detokenizer's size) beside the reconstruction, captioned with the token count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoConfig

from ..configuration_setok_pretraining import SetokForPreTrainingConfig
from ..image_processing_setok import SetokImageProcessor, load_image
from ..modeling_setok_pretraining import SetokForPreTraining
from ..pipeline_setok_detokenizer import SetokDetokenizerPipeline
from .errors import failure_for
from .tokenize import positive_int

CAPTION_HEIGHT = 14
MIN_PANEL_SIDE = 128


fail = failure_for("reconstruct")


def load_pretraining(model_path: str) -> tuple[SetokForPreTraining, SetokImageProcessor]:
    """The tokenizer + detokenizer checkpoint at `model_path` and its image processor."""
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        fail(f"--model {model_path} is no checkpoint folder here nor a model id the Hub could give")
    if not isinstance(config, SetokForPreTrainingConfig):
        fail(
            f"--model {model_path} holds a {type(config).__name__}; reconstruction needs a SetokForPreTraining "
            "folder (tokenizer and detokenizer)"
        )
    model = SetokForPreTraining.from_pretrained(model_path).eval()
    try:
        processor = SetokImageProcessor.from_pretrained(model_path)
    except OSError:
        processor = SetokImageProcessor.for_encoder(config.setok_config.vision_config)
    return model, processor


def side_by_side(original: Image.Image, reconstruction: Image.Image, caption: str) -> Image.Image:
    """`original | reconstruction`, each upscaled (nearest) to at least `MIN_PANEL_SIDE`, over a caption line."""
    side = max(reconstruction.width, MIN_PANEL_SIDE)
    canvas = Image.new("RGB", (2 * side, side + CAPTION_HEIGHT), "white")
    for column, panel in enumerate((original, reconstruction)):
        canvas.paste(panel.convert("RGB").resize((side, side), Image.Resampling.NEAREST), (column * side, 0))
    ImageDraw.Draw(canvas).text((2, side + 1), caption, fill="black")
    return canvas


@torch.no_grad()
def reconstruct(
    model: SetokForPreTraining,
    processor: SetokImageProcessor,
    image: Image.Image,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    seed: int = 0,
) -> tuple[Image.Image, int]:
    """One image redrawn from its tokens; returns `original | reconstruction` and the token count."""
    pixel_values = processor(images=[image], return_tensors="pt").pixel_values.to(model.device)
    tokens = model.setok(pixel_values)
    pipe = SetokDetokenizerPipeline.from_detokenizer(model.detokenizer)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(model.device).manual_seed(seed)
    drawn = pipe(
        tokens.tokens,
        tokens.token_mask,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generator,
    ).images[0]
    count = int(tokens.num_tokens[0])
    original = image.resize(drawn.size, Image.Resampling.BICUBIC)
    caption = f"original | reconstruction from {count} {'token' if count == 1 else 'tokens'}"
    return side_by_side(original, drawn, caption), count


def run(args: argparse.Namespace) -> int:
    """Reconstruct every image; print each token count and where its picture went."""
    if not args.guidance_scale >= 1:
        fail(f"--guidance-scale must be >= 1 (1 turns guidance off), got {args.guidance_scale}")
    paths = [Path(image) for image in args.images]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        fail(f"image file not found: {', '.join(missing)}")
    model, processor = load_pretraining(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        try:
            image = load_image(path)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            print(f"skipped {path}: {error}", file=sys.stderr)
            continue
        picture, count = reconstruct(
            model, processor, image, args.steps, guidance_scale=args.guidance_scale, seed=args.seed
        )
        target = args.out / f"{path.stem}_reconstruction.png"
        picture.save(target)
        print(f"{path}: {count} {'token' if count == 1 else 'tokens'} -> {target}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "reconstruct",
        help="redraw images from their SeTok tokens with the detokenizer, beside the originals",
        description="Tokenize each image, sample an image from its tokens and write "
        "<out>/<image stem>_reconstruction.png (original | reconstruction, with the token count).",
    )
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument(
        "--model", required=True, help="SetokForPreTraining checkpoint folder or Hub id (tokenizer + detokenizer)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("reconstructions"), help="output folder (default: %(default)s)"
    )
    parser.add_argument("--steps", type=positive_int, default=25, help="sampler steps (default: %(default)s)")
    parser.add_argument(
        "--guidance-scale", type=float, default=3.0, help="classifier-free guidance, 1 = off (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    parser.set_defaults(handler=run)
