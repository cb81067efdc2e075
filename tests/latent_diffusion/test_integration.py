"""engine.integrations.diffusers.accelerate on a real (tiny, offline) diffusers pipeline.

The pipeline is a DiffusionPipeline subclass holding only a vae, whose __call__ does what the
text-to-image pipelines do at their end (unscale, vae.decode(...)[0], VaeImageProcessor) and
whose `encode` does what img2img does at its start; no weights are downloaded."""

from __future__ import annotations

import pytest
import torch

from engine.integrations.diffusers import EngineVAE, accelerate

diffusers = pytest.importorskip("diffusers")


class LatentsToImages(diffusers.DiffusionPipeline):
    def __init__(self, vae) -> None:
        super().__init__()
        self.register_modules(vae=vae)
        factor = 2 ** (len(vae.config.get("block_out_channels", (0,) * 4)) - 1)
        self.image_processor = diffusers.image_processor.VaeImageProcessor(
            vae_scale_factor=factor)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        c = self.vae.config
        z = latents.to(self.vae.dtype) / c.scaling_factor + (c.shift_factor or 0.0)
        image = self.vae.decode(z, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="pt")

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dist = self.vae.encode(images).latent_dist
        return dist.sample(generator) * self.vae.config.scaling_factor, dist.mode(), dist.mean


# torch.compile (Inductor on the CPU) costs ~10 s per graph and layer count: it gets the
# smallest model that still has every block kind (resnets, attention, up/down sampling).
MINIMAL = dict(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
               latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
               scaling_factor=0.3611, shift_factor=0.1159)


@pytest.mark.parametrize("backend", ["onnxruntime", "compile"])
def test_pipeline_runs_unchanged_on_the_engine(build_kl, backend, tmp_path, rand_images):
    vae = build_kl("sd-like" if backend == "onnxruntime" else MINIMAL)  # quant convs or not
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.randn(2, vae.config.latent_channels, 5, 6)
    images = rand_images(2, 4 * f, 3 * f)
    original = LatentsToImages(vae)
    expected = original(latents)
    want_sample, want_mode, _ = original.encode(images, torch.Generator().manual_seed(7))
    pipe = accelerate(LatentsToImages(vae), backend=backend, cache_dir=tmp_path)
    assert isinstance(pipe.vae, EngineVAE) and pipe.vae.config is vae.config
    assert pipe.vae.dtype is torch.float32 and pipe.device.type == "cpu"
    torch.testing.assert_close(pipe(latents), expected, atol=1e-4, rtol=0)
    got_sample, got_mode, got_mean = pipe.encode(images, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got_mode, want_mode, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_mean, want_mode, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_sample, want_sample, atol=1e-4, rtol=0)  # same noise


def test_tiny_vae_and_export_cache(build_tiny, tmp_path, rand_images):
    vae = build_tiny()
    z, x = torch.randn(1, 4, 3, 3), rand_images(1, 8, 12)
    with torch.no_grad():
        want_images, want_latents = vae.decode(z).sample, vae.encode(x).latents
    first = EngineVAE(vae, "onnxruntime", cache_dir=tmp_path)
    exported = sorted(p.name for p in tmp_path.rglob("*.onnx"))
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.onnx")}
    second = EngineVAE(vae, "onnxruntime", cache_dir=tmp_path)  # same weights: reused
    assert exported == ["decoder.onnx", "encoder.onnx"]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.onnx")} == stamps
    for engine_vae in (first, second):
        torch.testing.assert_close(engine_vae.decode(z).sample, want_images, atol=1e-4, rtol=0)
        torch.testing.assert_close(engine_vae.encode(x).latents, want_latents, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="expected a diffusers AutoencoderKL"):
        accelerate(type("P", (), {"vae": torch.nn.Linear(1, 1)})())
