"""Latents in, images out, and back: the logic of `python -m engine.sample decode|encode`.

    decode:  LATENTS (.safetensors / .npy) -> [--scaled: z = latents / scaling + shift]
             -> VAE decode (optionally tiled) -> one PNG per image, written atomically
    encode:  IMAGES -> [-1, 1] -> VAE encode -> posterior mean (or a draw with --sample)
             -> latents = (z - shift) * scaling -> one .safetensors file (key "latents")

Convention: `encode` writes latents as a diffusion model consumes them, diffusers' pipeline
convention `(z - shift_factor) * scaling_factor`, and records that in the file's metadata
(`scaled` "true", scaling_factor, shift_factor); `decode --scaled` undoes it exactly, and
refuses a file whose metadata says `scaled` when --scaled is missing.

A VAE is a `VaeHandle`: a pretrained latent-diffusion VAE runs as the PyTorch model (dtype,
tiling, the fp32 rerun of overflowing rows), anything else through engine.runtime.Sampler (an
export directory, an .onnx or .pt2 file, or --backend compile).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from engine.checkpoint import atomic_write
from engine.models.latent_diffusion.pretrained import (
    PICKLE_SUFFIXES,
    from_pretrained,
    is_pretrained_path,
)
from engine.runtime import Sampler

LATENT_KEY = "latents"
PICKLE_HINT = ("refusing {path}: {suffix} files are pickles and this engine never unpickles;"
               " convert them once where you trust the file:  import torch, safetensors.torch"
               " as st; st.save_file({{'latents': torch.load('{path}', weights_only=True)"
               ".contiguous()}}, '{stem}.safetensors')")


@dataclass
class VaeHandle:
    """A loaded VAE as the commands use it: float32 CPU tensors in and out."""

    decode: Callable[[Tensor], Tensor]  # z (B, C, h, w) -> images (B, 3, H, W) in [-1, 1]
    encode: Callable[[Tensor], tuple[Tensor, ...]]  # images -> (mean, logvar) or (latents,)
    scaling_factor: float
    shift_factor: float
    factor: int  # image side / latent side
    label: str


def load_vae(path: str, backend: str | None = None, device: str | None = None,
             dtype: str | None = None, config: str | None = None, tile: int | None = None,
             overlap: int = 8) -> VaeHandle:
    """A VaeHandle for `path`; `tile` (latent pixels) needs a pretrained VAE's tiled_decode."""
    if is_pretrained_path(path) and backend in (None, "eager"):
        return _model_handle(from_pretrained(path, dtype, device or "cpu", config), tile,
                             overlap, path)
    if tile is not None or dtype is not None:
        raise ValueError(f"--tile and --dtype run the PyTorch model of a pretrained VAE (a"
                         f" diffusers folder, a .safetensors file or a TAESD pair); {path} with"
                         f" backend {backend or 'auto'} runs through the runtime")
    sampler = Sampler.load(path, backend=backend, device=device, config=config)
    spec = sampler.spec
    if not spec.spatial_factor:
        raise ValueError(f"{path} is not a latent-diffusion VAE ({spec.family}); decode and"
                         " encode take SD/SDXL/SD3/FLUX VAEs and TAESD")
    return VaeHandle(lambda z: sampler.decode(z.to(sampler.device)).float().cpu(),
                     lambda x: tuple(t.float().cpu() for t in _tuple(sampler.encode(x))),
                     spec.scaling_factor, spec.shift_factor, spec.spatial_factor,
                     f"{sampler.info.backend} on {sampler.info.device}")


def _tuple(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (out,) if isinstance(out, Tensor) else tuple(out)


def _model_handle(model, tile: int | None, overlap: int, path: str) -> VaeHandle:
    device = next(model.parameters()).device
    if tile is not None and not hasattr(model, "tiled_decode"):
        raise ValueError(f"--tile: {type(model).__name__} has no tiled_decode/tiled_encode in"
                         " this build of the engine; drop --tile")

    def decode(z: Tensor) -> Tensor:
        with torch.inference_mode():
            z = z.to(device)
            out = model.tiled_decode(z, tile_size=tile, overlap=overlap) if tile else \
                model.decode(z)
        return out.float().cpu()

    def encode(x: Tensor) -> tuple[Tensor, ...]:
        with torch.inference_mode():
            x = x.to(device)
            if tile:
                # --tile is in latent pixels; tiled_encode takes image pixels
                post = model.tiled_encode(x, tile_size=tile * model.downsample_factor,
                                          overlap=overlap)
            else:
                post = model.encode(x)
        outs = (post.mean, post.logvar) if model.encoder_output_names[0] == "mean" else \
            (post.mean,)
        return tuple(t.float().cpu() for t in outs)

    cfg = model.config
    return VaeHandle(decode, encode, cfg.scaling_factor, cfg.shift_factor,
                     model.downsample_factor,
                     f"PyTorch {str(model.dtype).removeprefix('torch.')} on {device}")


# --- latents files -----------------------------------------------------------------------------
def read_latents(path: str | os.PathLike) -> tuple[Tensor, dict[str, str]]:
    """(latents (B, C, h, w) float32, metadata) from a .safetensors (one tensor, or the key
    "latents") or .npy file; pickles are refused with a conversion recipe."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(PICKLE_HINT.format(path=p, suffix=p.suffix, stem=p.with_suffix("")))
    if not p.is_file():
        raise ValueError(f"no latents file at {p}")
    if p.suffix == ".npy":
        try:
            array, meta = np.load(p, allow_pickle=False), {}
        except ValueError as e:
            raise ValueError(f"{p}: not a plain numeric .npy array ({e})") from e
        latents = torch.from_numpy(np.ascontiguousarray(array))
    elif p.suffix == ".safetensors":
        latents, meta = _read_safetensors_latents(p)
    else:
        raise ValueError(f"{p}: expected a .safetensors or .npy latents file")
    if latents.dim() == 3:
        latents = latents[None]
    if latents.dim() != 4 or not latents.is_floating_point():
        raise ValueError(f"{p}: expected float latents (B, C, h, w) or (C, h, w), got"
                         f" {tuple(latents.shape)} {latents.dtype}")
    return latents.float(), meta


def _read_safetensors_latents(p: Path) -> tuple[Tensor, dict[str, str]]:
    try:
        with safe_open(str(p), framework="pt") as f:
            keys, meta = list(f.keys()), f.metadata() or {}
            key = LATENT_KEY if LATENT_KEY in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ValueError(f"{p} holds {len(keys)} tensors {keys[:5]}; expected one, or"
                                 f" one named {LATENT_KEY!r}")
            return f.get_tensor(key), meta
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {p} as safetensors: {e}") from e


def unscale(latents: Tensor, vae: VaeHandle) -> Tensor:
    """Diffusion latents -> what decode takes: latents / scaling_factor + shift_factor."""
    return latents / vae.scaling_factor + vae.shift_factor


def encoded_metadata(vae: VaeHandle, source: str, sample: bool, seed: int | None
                     ) -> dict[str, str]:
    """What `encode` records beside the latents: they are scaled, and how."""
    return {"scaled": "true", "scaling_factor": repr(vae.scaling_factor),
            "shift_factor": repr(vae.shift_factor), "vae": str(source),
            "posterior": "sample" if sample else "mean", "seed": str(seed)}


def write_latents(path: str | os.PathLike, latents: Tensor, meta: dict[str, str]) -> Path:
    """`latents` under key "latents" with string metadata; temp file then rename."""
    p = Path(path)
    if p.suffix != ".safetensors":
        raise ValueError(f"--out {p}: latents are written as .safetensors")
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {LATENT_KEY: latents.contiguous()}
    return atomic_write(p, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


# --- images ------------------------------------------------------------------------------------
def save_png(image: Tensor, path: Path) -> Path:
    """One image (3, H, W) in [-1, 1] as an 8-bit PNG: temp file then rename."""
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    png = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    return atomic_write(path, lambda tmp: png.save(tmp, format="PNG"))


def read_image(path: str | os.PathLike, factor: int) -> Tensor:
    """(3, H, W) in [-1, 1] from an image file; H and W must be multiples of `factor`."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.float32)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    h, w = array.shape[:2]
    if h % factor or w % factor:
        raise ValueError(f"{path}: {w}x{h} pixels; the VAE needs width and height multiples of"
                         f" {factor}: crop or resize it (e.g. to {w // factor * factor}x"
                         f"{h // factor * factor})")
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def batches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def decode_to_pngs(vae: VaeHandle, latents: Tensor, out_dir: str | os.PathLike,
                   batch_size: int = 1) -> list[Path]:
    """Decode (B, C, h, w) in batches; one PNG per image, `<out_dir>/000000.png`, ..."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tqdm(total=latents.shape[0], desc="decode", unit="img") as bar:
        for rows in batches(latents.shape[0], batch_size):
            images = vae.decode(latents[rows])
            for i, image in zip(range(rows.start, rows.stop), images):
                written.append(save_png(image, out / f"{i:06d}.png"))
            bar.update(rows.stop - rows.start)
    return written


def encode_images(vae: VaeHandle, paths: list[str], sample: bool, seed: int | None) -> Tensor:
    """(N, C, h, w) latents of the images, in the diffusion convention (module docstring)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else 0)
    rows, size = [], None
    for path in tqdm(paths, desc="encode", unit="img"):
        x = read_image(path, vae.factor)
        if size is not None and x.shape != size:
            raise ValueError(f"{path} is {tuple(x.shape[1:])}, the first image"
                             f" {tuple(size[1:])}: one latents file holds images of one size")
        size = x.shape
        outputs = vae.encode(x[None])
        z = outputs[0]
        if sample and len(outputs) == 2:  # TAESD's posterior is a point mass: mean == sample
            z = z + (0.5 * outputs[1]).exp() * torch.randn(z.shape, generator=gen)
        rows.append((z - vae.shift_factor) * vae.scaling_factor)
    if not rows:
        raise ValueError("encode: no images given")
    return torch.cat(rows)

