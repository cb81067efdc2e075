"""Single-file layouts: LDM/SGM AutoencoderKL files and TAESD's original pair.

The LDM names written by our inverse map are checked key for key by diffusers' own single-file
converter (an independent reader of that layout); the TAESD pair is checked by loading it,
strictly, into the original TAESD architecture written out here as plain nn.Sequential."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from engine.models import from_pretrained
from engine.models.latent_diffusion import layouts
from engine.models.latent_diffusion.layouts import LayoutError

convert = pytest.importorskip("diffusers.loaders.single_file_utils").convert_ldm_vae_checkpoint


def _save(tensors: dict[str, torch.Tensor], path) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


def test_ldm_names_match_diffusers_converter_key_for_key(kl_pair):
    _, vae = kl_pair
    state = vae.state_dict()
    ldm = layouts.diffusers_to_ldm(state)
    assert "encoder.down.0.block.0.norm1.weight" in ldm
    assert ("quant_conv.weight" in ldm) == vae.config.use_quant_conv
    if vae.config.mid_block_add_attention:
        assert ldm["decoder.mid.attn_1.q.weight"].shape[-2:] == (1, 1)  # 1x1 conv weights
    back = convert(dict(ldm), dict(vae.config))
    assert set(back) == set(state)
    for key, tensor in state.items():
        assert torch.equal(back[key].reshape(tensor.shape), tensor), key
    assert layouts.ldm_to_diffusers(ldm).keys() == state.keys()


def test_ldm_up_blocks_are_numbered_in_reverse():
    assert layouts.ldm_to_diffusers_key("decoder.up.3.block.2.conv1.weight", 4) == \
        "decoder.up_blocks.0.resnets.2.conv1.weight"
    assert layouts.diffusers_to_ldm_key("decoder.up_blocks.0.upsamplers.0.conv.bias", 4) == \
        "decoder.up.3.upsample.conv.bias"


@torch.no_grad()
def test_full_checkpoint_single_file_loads_identically(kl_folder, tmp_path, rand_images):
    vae, folder = kl_folder
    ldm = layouts.diffusers_to_ldm(vae.state_dict())
    others = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4),
              "cond_stage_model.transformer.x": torch.randn(3)}
    _save({**{f"first_stage_model.{k}": v for k, v in ldm.items()}, **others},
          tmp_path / "v1-full.safetensors")
    from_folder = from_pretrained(folder)
    single = from_pretrained(tmp_path / "v1-full.safetensors",
                             config=dataclasses.replace(from_folder.config))
    x, z = rand_images(2, 16, 24), torch.randn(2, 4, 5, 6)
    assert torch.equal(single.decode(z), from_folder.decode(z))
    assert torch.equal(single.encode(x).mean, from_folder.encode(x).mean)


def test_config_inferred_from_shapes_and_named_presets(build_kl, tmp_path):
    vae = build_kl(dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32,
                        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False))
    path = tmp_path / "ae.safetensors"
    _save(layouts.diffusers_to_ldm(vae.state_dict()), path)
    inferred = from_pretrained(path).config
    assert (inferred.block_out_channels, inferred.layers_per_block, inferred.latent_channels,
            inferred.use_quant_conv) == ((32, 64), 2, 16, False)
    assert (inferred.scaling_factor, inferred.shift_factor) == (0.3611, 0.1159)  # flux default
    sd3 = from_pretrained(path, config="sd3").config
    assert (sd3.scaling_factor, sd3.shift_factor) == (1.5305, 0.0609)
    with pytest.raises(LayoutError, match="latent_channels=4.*have 16"):
        from_pretrained(path, config="sd15")
    z = torch.randn(1, 16, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(path).decode(z), vae.decode(z).sample,
                                   atol=1e-4, rtol=0)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(n, n, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(n, n, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(n, n, 3, padding=1))
        self.skip, self.fuse = nn.Identity(), nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def original_taesd_decoder(latent: int, n: int, blocks: tuple[int, ...]) -> nn.Sequential:
    """madebyollin's Decoder: Clamp, conv, ReLU, then per stage Blocks and (Upsample, conv) or
    the last conv to RGB; images in [0, 1]."""
    layers: list[nn.Module] = [Clamp(), nn.Conv2d(latent, n, 3, padding=1), nn.ReLU()]
    for i, count in enumerate(blocks):
        layers += [Block(n) for _ in range(count)]
        last = i == len(blocks) - 1
        layers += [] if last else [nn.Upsample(scale_factor=2)]
        layers.append(nn.Conv2d(n, 3 if last else n, 3, padding=1, bias=last))
    return nn.Sequential(*layers)


@torch.no_grad()
def test_taesd_pair_in_original_layout(build_tiny, tmp_path, rand_images):
    vae = build_tiny()
    for part in ("encoder", "decoder"):
        _save(layouts.diffusers_to_taesd(vae.state_dict(), part),
              tmp_path / f"taesd_{part}.safetensors")
    original = original_taesd_decoder(4, 16, (1, 2, 1))
    original.load_state_dict(layouts.diffusers_to_taesd(vae.state_dict(), "decoder"))  # strict
    z = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(original(z) * 2 - 1, vae.decode(z).sample, atol=1e-5, rtol=0)
    x = rand_images(1, 16, 8)
    for path in (tmp_path, tmp_path / "taesd_encoder.safetensors",
                 tmp_path / "taesd_decoder.safetensors"):
        model = from_pretrained(path)
        assert model.config.num_decoder_blocks == (1, 2, 1)
        torch.testing.assert_close(model.decode(z), vae.decode(z).sample, atol=1e-4, rtol=0)
        torch.testing.assert_close(model.encode(x).mean, vae.encode(x).latents, atol=1e-4,
                                   rtol=0)


def test_bad_files_give_one_line_errors(kl_folder, build_tiny, tmp_path):
    vae, folder = kl_folder
    for name in ("vae.ckpt", "diffusion_pytorch_model.bin"):
        (tmp_path / name).write_bytes(b"\x80\x04")
        with pytest.raises(LayoutError, match="never unpickles.*weights_only=True"):
            from_pretrained(tmp_path / name)
    ldm = layouts.diffusers_to_ldm(vae.state_dict())
    extra = {"encoder.down.0.block.0.extra.weight": torch.zeros(1)}
    _save({**ldm, **extra}, tmp_path / "x.safetensors")
    with pytest.raises(LayoutError, match="'encoder.down.0.block.0.extra.weight'"):
        from_pretrained(tmp_path / "x.safetensors")
    bad = dict(ldm, **{"decoder.conv_out.bias": torch.zeros(5)})
    _save(bad, tmp_path / "y.safetensors")
    with pytest.raises(LayoutError, match="'decoder.conv_out.bias' has shape"):
        from_pretrained(tmp_path / "y.safetensors", config="sd15")
    (tmp_path / "trunc.safetensors").write_bytes((folder / "diffusion_pytorch_model.safetensors")
                                                 .read_bytes()[:1000])
    with pytest.raises(LayoutError, match="cannot read"):
        from_pretrained(tmp_path / "trunc.safetensors")
    half = tmp_path / "pair"
    half.mkdir()
    _save(layouts.diffusers_to_taesd(build_tiny().state_dict(), "decoder"),
          half / "taef1_decoder.safetensors")
    with pytest.raises(LayoutError, match="taef1_encoder.safetensors is missing"):
        from_pretrained(half / "taef1_decoder.safetensors")
