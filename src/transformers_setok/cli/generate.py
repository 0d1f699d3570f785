"""`setok generate`, `setok edit` and `setok segment`: a Setokim that draws, edits and segments, from the shell.

    setok generate "A red circle above a blue square." --model path/to/setokim --out gen/
    setok edit photo.png "Make the circle green." --model path/to/setokim --out gen/
    setok segment photo.png "the red circle" --model path/to/setokim --out seg/

`generate` writes `<out>/generated.png`, `edit` writes `<out>/<image stem>_edited.png` and `segment` writes
`<out>/<image stem>_mask.png` (the mask over the picture); each prints how many vision tokens the model wrote.
The prompt is put in the model's chat template as the user's turn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig

from ..configuration_setokim import SetokimConfig
from ..image_processing_setok import load_image
from ..modeling_setokim import SetokimForConditionalGeneration
from ..processing_setokim import SetokimProcessor
from ..recipes.world_data import chat_inputs, segment_request
from .errors import fail
from .tokenize import positive_int

MASK_COLOUR = (255, 40, 40)


def load_setokim(command: str, model_path: str) -> tuple[SetokimForConditionalGeneration, SetokimProcessor]:
    """The Setokim at `model_path` and its processor, or a one-line error naming what the folder lacks."""
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        fail(command, f"--model {model_path} is no checkpoint folder here nor a model id the Hub could give")
    if not isinstance(config, SetokimConfig):
        fail(command, f"--model {model_path} holds a {type(config).__name__}; pass a Setokim folder")
    model = SetokimForConditionalGeneration.from_pretrained(model_path).eval()
    try:
        processor = SetokimProcessor.from_pretrained(model_path)
    except OSError:
        fail(command, f"--model {model_path} has no processor (tokenizer and image processor); save it there")
    processor.tokenizer.padding_side = "left"
    return model, processor


def open_image(command: str, path: Path) -> Image.Image:
    if not path.is_file():
        fail(command, f"image file not found: {path}")
    try:
        return load_image(path)
    except OSError as error:
        fail(command, f"cannot read {path} as an image ({error})")


def mask_overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """`image` with the `(height, width)` boolean `mask` tinted in `MASK_COLOUR`."""
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    pixels[mask] = 0.45 * pixels[mask] + 0.55 * np.array(MASK_COLOUR)
    return Image.fromarray(pixels.astype(np.uint8))


def draw(args: argparse.Namespace) -> int:
    """`generate` and `edit`: one image drawn from the prompt (and the input image, when editing)."""
    command = "edit" if args.image is not None else "generate"
    image = open_image(command, args.image) if args.image is not None else None
    model, processor = load_setokim(command, args.model)
    try:
        out = model.generate_images(
            **chat_inputs(processor, [args.prompt], None if image is None else [image]),
            max_image_tokens=args.max_image_tokens,
            max_new_tokens=args.max_new_tokens,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            generator=torch.Generator().manual_seed(args.seed),
        )
    except ValueError as error:
        fail(command, str(error))
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / (f"{args.image.stem}_edited.png" if image is not None else "generated.png")
    out.images[0].save(target)
    print(f"{args.prompt!r}: {int(out.num_tokens[0])} vision tokens -> {target}")
    return 0


def segment(args: argparse.Namespace) -> int:
    """`segment`: the mask of what the prompt refers to, drawn over the picture."""
    image = open_image("segment", args.image)
    model, processor = load_setokim("segment", args.model)
    inputs = chat_inputs(processor, [segment_request(args.expression)], [image])
    try:
        out = model.segment(**inputs, max_new_tokens=args.max_new_tokens)
    except ValueError as error:
        fail("segment", str(error))
    mask = processor.post_process_masks(out, target_sizes=[(image.height, image.width)])[0].numpy()
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"{args.image.stem}_mask.png"
    mask_overlay(image, mask).save(target)
    found = (
        f"{int(out.num_tokens[0])} region tokens, {int(mask.sum())} pixels"
        if bool(out.region_found[0])
        else ("no region written")
    )
    print(f"{args.expression!r} in {args.image}: {found} -> {target}")
    return 0


def add_common_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--model", required=True, help="Setokim checkpoint folder or Hub id")
    parser.add_argument("--out", type=Path, default=Path(out), help="output folder (default: %(default)s)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=0, help="text the model may write first (default: %(default)s)"
    )


def register(commands: argparse._SubParsersAction) -> None:
    for name, summary in (("generate", "draw an image from a text prompt"), ("edit", "edit an image as told")):
        parser = commands.add_parser(
            name, help=summary, description=f"{summary[0].upper()}{summary[1:]} with Setokim."
        )
        if name == "edit":
            parser.add_argument("image", type=Path, help="the image to edit")
        parser.add_argument("prompt", help="what to draw" if name == "generate" else "the instruction")
        add_common_arguments(parser, "generated")
        parser.add_argument(
            "--max-image-tokens", type=positive_int, help="most vision tokens to write (default: the model's budget)"
        )
        parser.add_argument("--steps", type=positive_int, default=25, help="sampler steps (default: %(default)s)")
        parser.add_argument(
            "--guidance-scale",
            type=float,
            default=3.0,
            help="classifier-free guidance, 1 = off (default: %(default)s)",
        )
        parser.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
        parser.set_defaults(handler=draw)
        if name == "generate":
            parser.set_defaults(image=None)
    parser = commands.add_parser(
        "segment", help="segment what an expression refers to", description="Segment with Setokim's mask decoder."
    )
    parser.add_argument("image", type=Path, help="the image")
    parser.add_argument("expression", help="what to segment, e.g. 'the red circle'")
    add_common_arguments(parser, "segmentation")
    parser.set_defaults(handler=segment)
