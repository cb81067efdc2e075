"""AutoencoderKL and AutoencoderTiny against diffusers: layout, encode/decode parity through
save_pretrained -> from_pretrained, the protocol's shape contract and checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import checkpoint
from engine.models import build_model, config_from_dict, config_to_dict, from_pretrained
from engine.models.latent_diffusion.autoencoder_kl import AutoencoderKL
from engine.models.latent_diffusion.taesd import AutoencoderTiny

ATOL = 1e-4  # fp32; observed differences are 0 (same ops in the same order)


def test_state_dict_layout_is_diffusers(kl_pair, build_tiny):
    name, vae = kl_pair
    ours = from_pretrained_like(vae)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    tiny = build_tiny()
    ours_tiny = build_model("autoencoder-tiny", "taesd", encoder_block_out_channels=(16,) * 3,
                            decoder_block_out_channels=(16,) * 3, num_encoder_blocks=(1, 2, 1),
                            num_decoder_blocks=(1, 2, 1))
    assert {k: tuple(v.shape) for k, v in ours_tiny.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in tiny.state_dict().items()}


def from_pretrained_like(vae) -> AutoencoderKL:
    c = vae.config
    return build_model("autoencoder-kl", "sd15", block_out_channels=tuple(c.block_out_channels),
                       layers_per_block=c.layers_per_block, latent_channels=c.latent_channels,
                       norm_num_groups=c.norm_num_groups, use_quant_conv=c.use_quant_conv,
                       use_post_quant_conv=c.use_post_quant_conv,
                       mid_block_add_attention=c.mid_block_add_attention)


@torch.no_grad()
def test_kl_parity_through_save_pretrained(kl_pair, tmp_path, rand_images):
    name, vae = kl_pair
    vae.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert isinstance(ours, AutoencoderKL) and ours.config.norm_num_groups == \
        vae.config.norm_num_groups
    assert ours.config.scaling_factor == vae.config.scaling_factor
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    x = rand_images(2, 3 * f, 5 * f)  # non-square
    ref, got = vae.encode(x).latent_dist, ours.encode(x)
    torch.testing.assert_close(got.mean, ref.mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.logvar, ref.logvar, atol=ATOL, rtol=0)
    z = torch.randn(2, vae.config.latent_channels, 5, 3)
    torch.testing.assert_close(ours.decode(z), vae.decode(z).sample, atol=ATOL, rtol=0)


@torch.no_grad()
def test_tiny_parity_and_point_mass_posterior(build_tiny, tmp_path, rand_images):
    vae = build_tiny(latent_channels=16)
    vae.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert isinstance(ours, AutoencoderTiny) and ours.config.latent_channels == 16
    x = rand_images(2, 24, 40)
    post = ours.encode(x)
    torch.testing.assert_close(post.mean, vae.encode(x).latents, atol=ATOL, rtol=0)
    assert torch.equal(post.sample(seed=3), post.mean)  # zero variance: the draw is the mean
    assert torch.isinf(post.kl()).all() and (post.kl() > 0).all()
    z = torch.randn(3, 16, 4, 7)
    torch.testing.assert_close(ours.decode(z), vae.decode(z).sample, atol=ATOL, rtol=0)


def test_shape_contract_errors():
    model = build_model("autoencoder-kl", "flux", block_out_channels=(16, 16),
                        layers_per_block=1, norm_num_groups=8)
    with pytest.raises(ValueError, match="16 latent channels"):
        model.decode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="concatenated"):
        model.decode(torch.randn(1, 32, 8, 8))
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.rand(1, 3, 15, 16))
    with pytest.raises(ValueError, match="no prior"):
        model.sample(4)
    out = model.decode(torch.randn(1, 16, 3, 5))  # any latent height and width
    assert out.shape == (1, 3, 6, 10)


def test_latent_normalization_is_diffusers_convention():
    model = build_model("autoencoder-kl", "flux", block_out_channels=(16,), layers_per_block=1,
                        norm_num_groups=8)
    z = torch.randn(2, 16, 3, 3)
    expected = (z - 0.1159) * 0.3611
    torch.testing.assert_close(model.normalize_latents(z), expected)
    torch.testing.assert_close(model.denormalize_latents(expected), z)


@torch.no_grad()
def test_checkpoint_and_model_from_config_round_trip(tmp_path):
    model = build_model("autoencoder-kl", "sdxl", block_out_channels=(16, 32), layers_per_block=1,
                        norm_num_groups=8).eval()
    assert config_from_dict(config_to_dict(model.config)) == model.config
    checkpoint.save(tmp_path / "ckpt", model)
    loaded, _ = checkpoint.load_model(tmp_path / "ckpt")
    z = torch.randn(1, 4, 4, 6)
    assert dataclasses.asdict(loaded.config)["scaling_factor"] == 0.13025
    assert torch.equal(loaded.decode(z), model.decode(z))


def test_named_preset_on_a_diffusers_folder_keeps_its_architecture(kl_folder):
    _, folder = kl_folder
    cfg = from_pretrained(folder, config="sdxl").config
    assert (cfg.scaling_factor, cfg.norm_num_groups, cfg.block_out_channels) == \
        (0.13025, 8, (32, 64))
    with pytest.raises(ValueError, match="latent_channels=16"):
        from_pretrained(folder, config="flux")
