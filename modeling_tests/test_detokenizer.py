"""SetokDetokenizer: token conditioning, null tokens, the denoising loss, starting from a Stable Diffusion folder."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import randomize_weights
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from huggingface_hub.errors import StrictDataclassError
from pretraining_fixtures import (
    CANVAS_SETTINGS,
    TOKEN_SIZE,
    reference_canvas_shares,
    tiny_detokenizer_config,
    tiny_unet_config,
)

from transformers_setok import SetokDetokenizer, SetokDetokenizerPipeline


@pytest.fixture
def detokenizer() -> SetokDetokenizer:
    torch.manual_seed(0)
    return randomize_weights(SetokDetokenizer(tiny_detokenizer_config()), seed=4).eval()


def training_inputs(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return dict(
        images=torch.rand(batch, 3, 8, 8, generator=generator) * 2 - 1,
        tokens=torch.randn(batch, 4, TOKEN_SIZE, generator=generator),
        token_mask=torch.tensor([[True] * 4, [True, True, False, False]][:batch]),
        noise=torch.randn(batch, 3, 8, 8, generator=generator),
        timesteps=torch.tensor([10, 70][:batch]),
    )


def test_conditioner_projects_tokens_and_swaps_in_null_tokens(detokenizer) -> None:
    conditioner = detokenizer.conditioner
    tokens = torch.randn(2, 1, TOKEN_SIZE)
    mask = torch.ones(2, 1, dtype=torch.bool)
    hidden, hidden_mask = conditioner(tokens, mask, drop_condition=torch.tensor([False, True]))
    weight, bias = conditioner.projection.weight, conditioner.projection.bias
    assert hidden.shape == (2, 2, 8)  # grown to the two null tokens
    torch.testing.assert_close(hidden[0, :1], tokens[0] @ weight.T + bias)
    torch.testing.assert_close(hidden[1], conditioner.null_tokens @ weight.T + bias)
    assert hidden_mask.tolist() == [[True, False], [True, True]]


def test_loss_equals_a_hand_written_epsilon_objective(detokenizer) -> None:
    inputs = training_inputs()
    loss = detokenizer(**inputs).loss
    scheduler = detokenizer.noise_scheduler
    alpha = scheduler.alphas_cumprod[inputs["timesteps"]][:, None, None, None]
    noisy = alpha.sqrt() * inputs["images"] + (1 - alpha).sqrt() * inputs["noise"]
    hidden = detokenizer.conditioner.projection(inputs["tokens"])
    with torch.no_grad():
        prediction = detokenizer.unet(
            noisy, inputs["timesteps"], encoder_hidden_states=hidden, encoder_attention_mask=inputs["token_mask"]
        ).sample
    torch.testing.assert_close(loss, ((prediction - inputs["noise"]) ** 2).mean(), atol=1e-6, rtol=0)


# U-Nets whose blocks only cross-attend (the tiny recipe's) run diffusers' first attention on the tokens too,
# and diffusers calls it without the tokens' mask.
# A canvas paints the tokens onto the pixels by a softmax over them, which padding must not enter either.
DETOKENIZER_KINDS = {
    "self and cross-attention": dict(unet_config=tiny_unet_config()),
    "only cross-attention": dict(unet_config=tiny_unet_config(only_cross_attention=True)),
    "token canvas": CANVAS_SETTINGS,
}


@pytest.mark.parametrize("settings", DETOKENIZER_KINDS.values(), ids=DETOKENIZER_KINDS.keys())
def test_masked_padding_changes_neither_the_loss_nor_the_drawing(settings, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = tiny_detokenizer_config(**settings)
    detokenizer = randomize_weights(SetokDetokenizer(config), seed=4).eval()
    inputs = training_inputs()
    padded = dict(inputs)
    padded["tokens"] = torch.cat([inputs["tokens"], 50 * torch.randn(2, 3, TOKEN_SIZE)], dim=1)
    padded["token_mask"] = torch.cat([inputs["token_mask"], torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(detokenizer(**padded).loss, detokenizer(**inputs).loss, atol=1e-6, rtol=0)

    SetokDetokenizerPipeline.from_detokenizer(detokenizer).save_pretrained(tmp_path)
    pipeline = SetokDetokenizerPipeline.from_pretrained(tmp_path)  # a plain diffusers U-Net, as users load one
    pipeline.set_progress_bar_config(disable=True)

    def draw(tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        images = pipeline(
            tokens, token_mask, num_inference_steps=2, guidance_scale=2.0, generator=generator, output_type="pt"
        )
        return images.images

    torch.testing.assert_close(
        draw(padded["tokens"], padded["token_mask"]), draw(inputs["tokens"], inputs["token_mask"]), atol=1e-5, rtol=0
    )


def test_training_drops_the_condition_with_the_configured_probability() -> None:
    torch.manual_seed(0)
    always = SetokDetokenizer(tiny_detokenizer_config(condition_drop_prob=1.0))
    inputs = training_inputs()
    dropped = always.train()(**inputs).loss
    other_tokens = always(**{**inputs, "tokens": torch.randn(2, 4, TOKEN_SIZE)}).loss
    conditioned = always.eval()(**inputs).loss
    torch.testing.assert_close(dropped, other_tokens)  # the tokens no longer matter
    assert (dropped - conditioned).abs() > 1e-4

    never = SetokDetokenizer(tiny_detokenizer_config(condition_drop_prob=0.0))
    never.load_state_dict(always.state_dict())
    torch.testing.assert_close(never.train()(**inputs).loss, conditioned)


def test_save_load_round_trip(detokenizer, tmp_path: Path) -> None:
    detokenizer.save_pretrained(tmp_path)
    reloaded = SetokDetokenizer.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(**training_inputs()).loss, detokenizer(**training_inputs()).loss)
    assert reloaded.config.unet_config == detokenizer.config.unet_config


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        (dict(tokens=torch.randn(2, 4, TOKEN_SIZE - 1)), "tokens must have width"),
        (dict(token_mask=torch.ones(2, 5, dtype=torch.bool)), "token_mask"),
        (dict(images=torch.randn(2, 3, 16, 16)), "images"),
        (dict(tokens=torch.randn(3, 4, TOKEN_SIZE), token_mask=torch.ones(3, 4, dtype=torch.bool)), "tokens hold 3"),
    ],
)
def test_bad_input_names_the_argument(detokenizer, change, argument) -> None:
    with pytest.raises(ValueError, match=argument):
        detokenizer(**{**training_inputs(), **change})


def save_tiny_stable_diffusion(folder: Path) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """A Stable-Diffusion-style folder (U-Net reading 8-wide text states, a VAE, a PNDM scheduler)."""
    torch.manual_seed(0)
    unet = randomize_weights(UNet2DConditionModel(**tiny_unet_config(in_channels=4, out_channels=4)), seed=1)
    vae = AutoencoderKL(
        block_out_channels=[8, 8],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
    )
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    PNDMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear").save_pretrained(folder / "scheduler")
    return unet, vae


def test_from_stable_diffusion_keeps_every_weight_when_widths_match(tmp_path: Path) -> None:
    unet, vae = save_tiny_stable_diffusion(tmp_path)
    detokenizer, info = SetokDetokenizer.from_stable_diffusion(
        tmp_path, token_size=TOKEN_SIZE, output_loading_info=True
    )
    assert info["reinitialized"] == [] and info["dropped"] == []
    for name, value in unet.state_dict().items():
        assert torch.equal(detokenizer.unet.state_dict()[name], value), name
    for name, value in vae.state_dict().items():
        assert torch.equal(detokenizer.vae.state_dict()[name], value), name
    assert detokenizer.config.scheduler_config["beta_schedule"] == "scaled_linear"
    assert detokenizer.image_size == 16

    pipe = SetokDetokenizerPipeline.from_detokenizer(detokenizer)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(torch.randn(1, 3, TOKEN_SIZE), num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    loss = detokenizer(torch.rand(1, 3, 16, 16) * 2 - 1, torch.randn(1, 3, TOKEN_SIZE), torch.ones(1, 3, dtype=bool))
    assert torch.isfinite(loss.loss)


def test_from_stable_diffusion_reinitialises_only_cross_attention_of_another_width(tmp_path: Path, caplog) -> None:
    unet, _ = save_tiny_stable_diffusion(tmp_path)
    with caplog.at_level(logging.WARNING):
        detokenizer, info = SetokDetokenizer.from_stable_diffusion(
            tmp_path, token_size=TOKEN_SIZE, cross_attention_dim=12, output_loading_info=True
        )
    cross_attention_inputs = sorted(
        name.rsplit(".", 1)[0] for name in unet.state_dict() if ".attn2.to_k." in name or ".attn2.to_v." in name
    )
    assert cross_attention_inputs and info["reinitialized"] == cross_attention_inputs
    assert (
        f"re-initialised {len(cross_attention_inputs)} U-Net layers" in caplog.text
        and cross_attention_inputs[0] in caplog.text
    )
    for name, value in unet.state_dict().items():
        if name.rsplit(".", 1)[0] not in cross_attention_inputs:
            assert torch.equal(detokenizer.unet.state_dict()[name], value), name
    assert detokenizer.unet.state_dict()[cross_attention_inputs[0] + ".weight"].shape[1] == 12
    assert detokenizer.conditioner.projection.out_features == 12


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        (dict(num_null_tokens=0), "num_null_tokens"),
        (dict(condition_drop_prob=1.5), "condition_drop_prob"),
        (dict(coordinate_channels=4), "in_channels"),  # a 3-channel U-Net input has no room for the code
        (dict(coordinate_channels=6, unet_config=tiny_unet_config(in_channels=9)), "multiple of 4"),
        (dict(canvas_channels=2, unet_config=tiny_unet_config(in_channels=5)), "needs coordinate_channels"),
        (dict(CANVAS_SETTINGS, unet_config=tiny_unet_config(in_channels=7)), "2 canvas channels"),
        (dict(timestep_sampling="lognormal"), "timestep_sampling"),
        (dict(timestep_sampling="logit_normal", timestep_logit_std=0.0), "timestep_logit_std"),
    ],
)
def test_config_rejects_impossible_settings(change, argument) -> None:
    with pytest.raises(StrictDataclassError, match=argument):
        tiny_detokenizer_config(**change)


def test_uniform_timesteps_are_drawn_as_before(detokenizer) -> None:
    torch.manual_seed(3)
    drawn = detokenizer.sample_timesteps(64, torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.randint(0, detokenizer.noise_scheduler.config.num_train_timesteps, (64,)))


def test_logit_normal_timesteps_follow_their_distribution() -> None:
    """With mean 1 and std 0.5, `t / T = sigmoid(N(1, 0.25))`: its median is `sigmoid(1) T`, and `t >= T / 2` is
    `P(N(1, 0.25) > 0) = 0.977`; the loss then runs on such timesteps."""
    config = tiny_detokenizer_config(timestep_sampling="logit_normal", timestep_logit_mean=1.0, timestep_logit_std=0.5)
    detokenizer = SetokDetokenizer(config)
    torch.manual_seed(0)
    drawn = detokenizer.sample_timesteps(20000, torch.device("cpu")).float()
    steps = detokenizer.noise_scheduler.config.num_train_timesteps
    assert abs(float(drawn.median()) - int(steps * torch.sigmoid(torch.tensor(1.0)).item())) <= 1
    assert abs(float((drawn >= steps // 2).float().mean()) - 0.977) < 0.005
    assert 0 <= int(drawn.min()) and int(drawn.max()) <= steps - 1
    seen = []
    hook = detokenizer.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    images, tokens = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 2, TOKEN_SIZE)
    torch.manual_seed(1)
    detokenizer(images, tokens, torch.ones(4, 2, dtype=torch.bool))
    hook.remove()
    torch.manual_seed(1)
    torch.randn(4, 3, 8, 8)  # the noise is drawn first
    assert torch.equal(seen[0], detokenizer.sample_timesteps(4, torch.device("cpu")))


def coordinate_detokenizer() -> SetokDetokenizer:
    torch.manual_seed(0)
    config = tiny_detokenizer_config(coordinate_channels=8, unet_config=tiny_unet_config(in_channels=11))
    return randomize_weights(SetokDetokenizer(config), seed=4).eval()


def unet_inputs(detokenizer: SetokDetokenizer, run) -> list[torch.Tensor]:
    """What the U-Net is called on while `run()` runs."""
    seen = []
    hook = detokenizer.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        run()
    finally:
        hook.remove()
    return seen


def training_and_sampling_unet_inputs(
    detokenizer: SetokDetokenizer, inputs: dict[str, torch.Tensor]
) -> tuple[list[torch.Tensor], SetokDetokenizerPipeline]:
    """The U-Net's inputs in one training step and in a 2-step guided drawing (one per step), and the pipeline."""
    pipeline = SetokDetokenizerPipeline.from_detokenizer(detokenizer)
    pipeline.set_progress_bar_config(disable=True)
    seen = unet_inputs(detokenizer, lambda: detokenizer(**inputs))
    seen += unet_inputs(
        detokenizer, lambda: pipeline(tokens=inputs["tokens"], token_mask=inputs["token_mask"], num_inference_steps=2)
    )
    assert len(seen) == 3
    return seen, pipeline


def test_coordinate_channels_give_the_unet_a_fourier_code_of_each_pixel_in_training_and_sampling() -> None:
    detokenizer = coordinate_detokenizer()
    inputs = training_inputs()
    position = torch.tensor([-1 + 2 * pixel / 7 for pixel in range(8)])  # 8 pixels from -1 to 1
    code = []  # sin x, cos x, sin y, cos y at the frequencies pi and 2 pi
    for function, along_x in [(torch.sin, True), (torch.cos, True), (torch.sin, False), (torch.cos, False)]:
        for frequency in (torch.pi, 2 * torch.pi):
            wave = function(frequency * position)
            code.append(wave[None, :].expand(8, 8) if along_x else wave[:, None].expand(8, 8))
    seen, pipeline = training_and_sampling_unet_inputs(detokenizer, inputs)
    for unet_input in seen:
        assert unet_input.shape[1] == 11
        torch.testing.assert_close(unet_input[:, 3:], torch.stack(code)[None].expand(len(unet_input), -1, -1, -1))
    image = pipeline(tokens=inputs["tokens"], token_mask=inputs["token_mask"], num_inference_steps=2, output_type="pt")
    assert image.images.shape == (2, 3, 8, 8)  # the code goes in, never comes out


def test_token_canvas_paints_each_pixel_with_its_share_of_the_real_tokens_in_training_and_sampling() -> None:
    torch.manual_seed(0)
    config = tiny_detokenizer_config(condition_drop_prob=0.0, **CANVAS_SETTINGS)
    detokenizer = randomize_weights(SetokDetokenizer(config), seed=4).eval()
    conditioner = detokenizer.conditioner
    inputs = training_inputs()
    hidden, mask = conditioner(inputs["tokens"], inputs["token_mask"])
    with torch.no_grad():
        shares = reference_canvas_shares(conditioner, hidden, mask, conditioner.coordinate_code(inputs["images"]))
        values = conditioner.canvas_value(hidden)
    expected = (shares[:, :, None] * values[:, :, :, None, None]).sum(dim=1)  # each pixel mixes the tokens' values
    seen, pipeline = training_and_sampling_unet_inputs(detokenizer, inputs)
    for unet_input in seen:  # with guidance, the conditional half comes first
        torch.testing.assert_close(unet_input[: len(expected), 7:], expected, atol=1e-5, rtol=0)
    assert expected.std(dim=(2, 3)).min() > 1e-3  # the canvas varies over the image: it is not one token's value
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # and each image has its own
