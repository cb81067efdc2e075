"""Tiled encode/decode equals the untiled model; diffusers' own tiling, side by side, does not.

The oracle is diffusers (AutoencoderKL, AutoencoderTiny) with every parameter jittered, GroupNorm
affine included, on fresh random inputs of sizes that are no multiple of the tile. Each
comparison also runs diffusers' `enable_tiling()` on the same weights and input, with its tiles
set as small as ours, and asserts that our error is orders of magnitude below its error.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.models.tiling import memory, tiled_decode, tiled_encode

diffusers = pytest.importorskip("diffusers")  # the oracle; optional dependency

TOL = 1e-4  # fp32: the tiled and the untiled model sum the same terms in another order


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The convs here are tiny; on a loaded machine intra-op threads only add waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def jitter_(model: nn.Module, scale: float = 0.2) -> nn.Module:
    """Perturb every parameter (GroupNorm weight 1 and bias 0 included) so tests see them."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def make_kl(channels: tuple[int, ...], layers: int, groups: int, latent: int,
            quant: bool) -> nn.Module:
    n = len(channels)
    return jitter_(diffusers.AutoencoderKL(
        block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=layers,
        norm_num_groups=groups, latent_channels=latent, use_quant_conv=quant,
        use_post_quant_conv=quant))


def make_tiny(width: int = 8) -> nn.Module:
    return jitter_(diffusers.AutoencoderTiny(
        encoder_block_out_channels=(width,) * 4, decoder_block_out_channels=(width,) * 4,
        num_encoder_blocks=(1, 2, 1, 1), num_decoder_blocks=(1, 1, 2, 1)), scale=0.05)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item()


def diffusers_tiled(vae: nn.Module, latent_tile: int, fn):
    """Run fn() with diffusers' tiling on, its tiles `latent_tile` latent pixels wide."""
    factor = 8 if hasattr(vae.decoder, "layers") else 2 ** (len(vae.decoder.up_blocks) - 1)
    vae.enable_tiling()
    vae.tile_latent_min_size, vae.tile_sample_min_size = latent_tile, latent_tile * factor
    try:
        with torch.no_grad():
            return fn()
    finally:
        vae.disable_tiling()


KL_CASES = {  # config, latent shape, our tile, diffusers' tile (latent px)
    "2blocks-g8-quant": (((32, 64), 1, 8, 4, True), (1, 4, 11, 7), 3, 4),
    "3blocks-g16-lat16-noquant": (((32, 64, 64), 2, 16, 16, False), (2, 16, 9, 13), 4, 4),
    "3blocks-g8-24x24": (((32, 64, 64), 1, 8, 4, True), (1, 4, 24, 24), 8, 8),
}


@pytest.mark.parametrize("case", list(KL_CASES))
def test_kl_tiled_decode_equals_untiled_and_beats_diffusers_tiling(case, record_property):
    config, shape, tile, their_tile = KL_CASES[case]
    vae, z = make_kl(*config), torch.randn(shape)
    with torch.no_grad():
        ref = vae.decode(z).sample
    ours = max_err(tiled_decode(vae, z, tile_size=tile), ref)
    theirs = max_err(diffusers_tiled(vae, their_tile, lambda: vae.decode(z).sample), ref)
    record_property("decode_max_abs_err", {"ours": ours, "diffusers_tiling": theirs,
                                           "output_max_abs": ref.abs().max().item()})
    assert ours <= TOL * max(1.0, ref.abs().max().item()), f"ours {ours:.2e}"
    assert theirs > 100 * ours, f"diffusers' tiling {theirs:.2e} vs ours {ours:.2e}"


@pytest.mark.parametrize("case", list(KL_CASES)[:2])
def test_kl_tiled_encode_equals_untiled_and_beats_diffusers_tiling(case, record_property):
    config, (b, _, h, w), tile, their_tile = KL_CASES[case]
    vae = make_kl(*config)
    factor = 2 ** (len(config[0]) - 1)
    x = torch.randn(b, 3, factor * h + 3, factor * w + 1)  # odd sizes, no multiple of a tile
    with torch.no_grad():
        ref = vae.encode(x).latent_dist
    post = tiled_encode(vae, x, tile_size=tile * factor + 1)
    ours = max(max_err(post.mean, ref.mean), max_err(post.logvar, ref.logvar))
    even = x[..., : factor * h, : factor * w]  # diffusers' tiling fails on 1-pixel edge tiles
    with torch.no_grad():
        even_ref = vae.encode(even).latent_dist.mean
    theirs = max_err(diffusers_tiled(vae, their_tile,
                                     lambda: vae.encode(even).latent_dist.mean), even_ref)
    record_property("encode_max_abs_err", {"ours": ours, "diffusers_tiling": theirs,
                                           "output_max_abs": ref.mean.abs().max().item()})
    assert ours <= TOL * max(1.0, ref.mean.abs().max().item()), f"ours {ours:.2e}"
    assert theirs > 100 * ours, f"diffusers' tiling {theirs:.2e} vs ours {ours:.2e}"


def test_tiny_tiled_decode_and_encode_equal_untiled_and_beat_diffusers_tiling(record_property):
    """diffusers' TAESD tiling needs 16-latent tiles here: with smaller ones its blend width
    rounds to 0 (tiles are dropped) or 1 (a 0/0 in its blend mask)."""
    vae = make_tiny()
    z, x = torch.randn(1, 4, 24, 20), torch.randn(1, 3, 192, 160)
    with torch.no_grad():
        ref_image, ref_latent = vae.decode(z).sample, vae.encode(x).latents
    ours = (max_err(tiled_decode(vae, z, tile_size=5), ref_image),
            max_err(tiled_encode(vae, x, tile_size=40), ref_latent))
    theirs = (max_err(diffusers_tiled(vae, 16, lambda: vae.decode(z).sample), ref_image),
              max_err(diffusers_tiled(vae, 16, lambda: vae.encode(x).latents), ref_latent))
    scales = (ref_image.abs().max().item(), ref_latent.abs().max().item())
    record_property("tiny_max_abs_err", {"ours": ours, "diffusers_tiling": theirs,
                                         "output_max_abs": scales})
    assert all(e <= TOL * max(1.0, s) for e, s in zip(ours, scales)), f"ours {ours}"
    assert min(theirs) > max(100 * max(ours), 1e-4), f"diffusers {theirs} vs ours {ours}"


@pytest.mark.parametrize("offload", ["none", "host"])
@pytest.mark.parametrize("tile", [1, 2, 5, 64])
def test_tile_geometry_edge_cases(tile, offload):
    """Tiles of 1 and 2 latent px, an odd tile, one tile larger than the map; maps parked on
    the host (keys and values streamed) or not."""
    vae = make_kl((8, 16), 1, 4, 4, True)
    z, x = torch.randn(1, 4, 5, 3), torch.randn(1, 3, 9, 7)
    with torch.no_grad():
        ref_image, ref = vae.decode(z).sample, vae.encode(x).latent_dist
    assert max_err(tiled_decode(vae, z, tile, offload=offload), ref_image) <= TOL
    post = tiled_encode(vae, x, tile, offload=offload)
    assert max(max_err(post.mean, ref.mean), max_err(post.logvar, ref.logvar)) <= TOL


def test_batches_past_the_upsample_limit_are_split_and_stay_exact(monkeypatch):
    vae = make_kl((8, 16), 1, 4, 4, True)
    z = torch.randn(5, 4, 6, 5)
    with torch.no_grad():
        ref = vae.decode(z).sample
    sizes = []  # (batch, elements) of every upsample output
    interpolate = torch.nn.functional.interpolate

    def spy(x, *args, **kwargs):
        y = interpolate(x, *args, **kwargs)
        sizes.append((y.shape[0], y.numel()))
        return y

    # one sample's largest upsampled tile: 16 channels x (2 * (3 + 2))^2 px = 1600 elements
    limit = 2 * 1600
    monkeypatch.setattr(memory, "UPSAMPLE_ELEMENT_LIMIT", limit)
    monkeypatch.setattr(torch.nn.functional, "interpolate", spy)
    out = tiled_decode(vae, z, tile_size=3)
    assert max_err(out, ref) <= TOL
    assert sizes and max(n for _, n in sizes) <= limit
    assert max(b for b, _ in sizes) < len(z), "no batch was split"
    monkeypatch.setattr(memory, "UPSAMPLE_ELEMENT_LIMIT", 100)  # below one sample's tile
    with pytest.raises(ValueError, match="smaller tile_size"):
        tiled_decode(vae, z, tile_size=3)


BAD_CALLS = [
    (lambda vae: tiled_decode(vae, torch.randn(1, 4, 6, 6), tile_size=0), ValueError, "tile_size"),
    (lambda vae: tiled_decode(vae, torch.randn(1, 4, 6, 6), tile_size=-3), ValueError,
     "tile_size"),
    (lambda vae: tiled_decode(vae, torch.randn(1, 4, 6, 6), tile_size=2.5), TypeError,
     "tile_size"),
    (lambda vae: tiled_decode(vae, torch.randn(4, 6, 6)), ValueError, "(B, 4, H, W)"),
    (lambda vae: tiled_decode(vae, torch.randn(1, 8, 6, 6)), ValueError, "(B, 4, H, W)"),
    (lambda vae: tiled_decode(vae, torch.randn(1, 4, 6, 6).double()), ValueError, "float64"),
    (lambda vae: tiled_decode(vae, torch.full((1, 4, 6, 6), float("nan"))), ValueError, "NaN"),
    (lambda vae: tiled_decode(vae, torch.randn(1, 4, 6, 6), offload="gpu"), ValueError,
     "offload"),
    (lambda vae: tiled_decode(vae, torch.randn(1, 4, 6, 6), overlap=-1), ValueError, "overlap"),
    (lambda vae: tiled_encode(vae, torch.randn(1, 4, 16, 16)), ValueError, "(B, 3, H, W)"),
    (lambda vae: tiled_encode(vae, torch.randn(1, 3, 1, 1)), ValueError, "too small"),
    (lambda vae: tiled_decode(nn.Linear(2, 2), torch.randn(1, 4, 6, 6)), ValueError,
     "AutoencoderKL"),
]


@pytest.mark.parametrize("call, error, words", BAD_CALLS)
def test_bad_arguments_give_one_line_errors(call, error, words):
    vae = make_kl((8, 16), 1, 4, 4, True)
    with pytest.raises(error) as info:
        call(vae)
    message = str(info.value)
    assert words in message and "\n" not in message, message


def test_overlap_is_accepted_and_leaves_the_result_alone():
    vae, z = make_kl((8, 16), 1, 4, 4, False), torch.randn(1, 4, 7, 6)
    a = tiled_decode(vae, z, tile_size=3)
    assert torch.equal(a, tiled_decode(vae, z, tile_size=3, overlap=2))


@pytest.mark.cuda
def test_cuda_host_offload_bounds_device_memory_by_the_tile():
    vae = make_kl((32, 64, 64), 1, 8, 4, True).cuda()
    z = torch.randn(1, 4, 96, 96, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        ref = vae.decode(z).sample
    untiled = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = tiled_decode(vae, z.cpu(), tile_size=16, offload="host")
    tiled = torch.cuda.max_memory_allocated()
    assert max_err(out.cuda(), ref) <= TOL * max(1.0, ref.abs().max().item())
    assert tiled < untiled / 4, f"tiled peak {tiled} vs untiled {untiled}"
