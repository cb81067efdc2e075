"""Drop-in acceleration of a diffusers pipeline's VAE.

    import diffusers
    from engine.integrations.diffusers import accelerate
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(...)
    accelerate(pipe, backend="onnxruntime")     # or "aoti", "compile"
    image = pipe(prompt).images[0]              # the pipeline runs unchanged

`accelerate` converts `pipe.vae` (diffusers' AutoencoderKL or AutoencoderTiny) into the engine's
model (same state-dict layout: no conversion), exports it for the chosen backend and puts an
`EngineVAE` in its place. EngineVAE has the surface pipelines use:

    decode(z, return_dict=True, generator=None) -> DecoderOutput(sample=...) or (sample,)
    encode(x, return_dict=True) -> AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution)
                                   (diffusers' own class: .sample(generator), .mode(), .mean),
                                   or AutoencoderTinyOutput(latents=...) for TAESD
    forward, config (the original vae's, unchanged), dtype, device, to(), enable_slicing(),
    and the submodules pipelines peek at (encoder, decoder, quant_conv, post_quant_conv)

Backends: "compile" runs torch.compile on the engine's model in the vae's dtype; "onnxruntime"
and "aoti" run the exported fp32 graphs (export.onnx / export.aoti, parity-checked at export)
and return outputs on the caller's device in the caller's dtype. Exports go to `cache_dir` (a
fresh temporary directory by default) under a fingerprint of the weights, so a second
`accelerate` of the same weights with the same cache_dir reuses them.

diffusers is an optional dependency: it is imported when these functions run, never at import.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from engine.models.latent_diffusion.base import (
    LatentDecoderView,
    LatentDiffusionVAE,
    LatentEncoderView,
)
from engine.models.latent_diffusion.configs import from_diffusers_json
from engine.models.latent_diffusion.pretrained import MODEL_CLS
from engine.runtime import Sampler
from export import aoti as aoti_export
from export import manifest
from export import onnx as onnx_export
from export.common import model_source

BACKENDS = ("onnxruntime", "aoti", "compile")


def engine_model(vae: nn.Module) -> LatentDiffusionVAE:
    """The engine's model (fp32, CPU) with the weights of a diffusers AutoencoderKL or
    AutoencoderTiny: the layouts are the same, only the config is translated."""
    name = type(vae).__name__
    config = from_diffusers_json({**dict(vae.config), "_class_name": name}, f"{name}.config")
    model = MODEL_CLS[type(config)](config)
    model.load_state_dict({k: v.detach().float().cpu() for k, v in vae.state_dict().items()})
    return model.eval()


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over the weights' names and bytes (fp32, CPU): the export cache key."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def export_for(model: LatentDiffusionVAE, backend: str, cache_dir: str | Path | None,
               device: str = "cpu") -> Path:
    """Export decoder and encoder for `backend` into `<cache_dir>/<fingerprint>/` (reused when
    its manifest already lists both); returns that directory."""
    root = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="vae-"))
    out = root / fingerprint(model)
    fmt = {"onnxruntime": "onnx", "aoti": "aoti"}[backend]
    listed = {e.get("part") for e in manifest.read(out).get("artifacts", {}).values()
              if e.get("format") == fmt and (out / e["file"]).is_file()}
    if {"decoder", "encoder"} <= listed:
        return out
    source = model_source(model, out)
    if backend == "onnxruntime":
        onnx_export.export_source(source, out)
    else:
        aoti_export.export_source(source, out, device, "decoder,encoder")
    return out


class _Runner:
    """decode / encode of one backend, float tensors in and out on the caller's device."""

    def __init__(self, model: LatentDiffusionVAE, backend: str, cache_dir: Any) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        self.backend = backend
        if backend == "compile":
            self._decoder = torch.compile(LatentDecoderView(model))
            self._encoder = torch.compile(LatentEncoderView(model))
            return
        out = export_for(model, backend, cache_dir)
        suffix = ".onnx" if backend == "onnxruntime" else ".pt2"
        self.sampler = Sampler.load(out / f"decoder{suffix}", device="cpu")
        self._decoder = lambda z: self.sampler.decode(z.float().cpu().contiguous())
        self._encoder = lambda x: self.sampler.encode(x.float().cpu().contiguous())

    def decode(self, z: Tensor) -> Tensor:
        with torch.inference_mode():
            return self._decoder(z).to(z.device, z.dtype)

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        with torch.inference_mode():
            out = self._encoder(x)
        out = (out,) if isinstance(out, Tensor) else tuple(out)
        return tuple(t.to(x.device, x.dtype) for t in out)


class EngineVAE(nn.Module):
    """An engine-backed stand-in for a diffusers VAE (see the module docstring)."""

    def __init__(self, vae: nn.Module, backend: str = "onnxruntime",
                 cache_dir: str | Path | None = None) -> None:
        super().__init__()
        self.config = vae.config  # the original FrozenDict: scaling_factor, block_out_channels..
        self.model = engine_model(vae)
        self._runner = _Runner(self.model, backend, cache_dir)
        self._tiny = self.model.encoder_output_names == ("latents",)
        self._dtype = next(vae.parameters()).dtype
        self.use_slicing = False
        self.to(next(vae.parameters()).device, self._dtype)

    # --- what pipelines read --------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    @property
    def decoder(self) -> nn.Module:
        return self.model.decoder

    @property
    def quant_conv(self) -> nn.Module | None:
        return getattr(self.model, "quant_conv", None)

    @property
    def post_quant_conv(self) -> nn.Module | None:
        return getattr(self.model, "post_quant_conv", None)

    def to(self, *args: Any, **kwargs: Any) -> EngineVAE:
        """As nn.Module.to; the dtype given is the one outputs come back in (and the compile
        backend runs in); the exported backends compute in fp32."""
        super().to(*args, **kwargs)
        self._dtype = next(self.model.parameters()).dtype
        return self

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    # --- decode / encode ------------------------------------------------------------------------
    def _rows(self, run: Any, t: Tensor) -> Any:
        if not self.use_slicing or t.shape[0] == 1:
            return run(t)
        parts = [run(row) for row in t.split(1)]
        return type(parts[0])(torch.cat(p) for p in zip(*parts)) \
            if isinstance(parts[0], tuple) else torch.cat(parts)

    def decode(self, z: Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        from diffusers.models.autoencoders.vae import DecoderOutput  # optional dependency

        sample = self._rows(self._runner.decode, z)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def encode(self, x: Tensor, return_dict: bool = True) -> Any:
        # diffusers is an optional dependency: imported when a pipeline calls in
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        outputs = self._rows(self._runner.encode, x)
        if self._tiny:
            from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput

            return AutoencoderTinyOutput(latents=outputs[0]) if return_dict else (outputs[0],)
        posterior = DiagonalGaussianDistribution(torch.cat(outputs, dim=1))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def forward(self, sample: Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None) -> Any:
        encoded = self.encode(sample)
        if self._tiny:
            z = encoded.latents
        else:
            dist = encoded.latent_dist
            z = dist.sample(generator=generator) if sample_posterior else dist.mode()
        return self.decode(z, return_dict=return_dict)


def accelerate(pipe: Any, backend: str = "onnxruntime", cache_dir: str | Path | None = None
               ) -> Any:
    """Swap `pipe.vae` for an EngineVAE on `backend` ("onnxruntime", "aoti", "compile");
    returns the pipeline. The original vae is dropped; its weights live on in the engine's
    model (`pipe.vae.model`), its config as `pipe.vae.config`."""
    vae = getattr(pipe, "vae", None)
    if vae is None or type(vae).__name__ not in ("AutoencoderKL", "AutoencoderTiny"):
        raise ValueError(f"accelerate(): the pipeline's vae is {type(vae).__name__}; expected a"
                         " diffusers AutoencoderKL or AutoencoderTiny")
    pipe.vae = EngineVAE(vae, backend, cache_dir)
    return pipe
