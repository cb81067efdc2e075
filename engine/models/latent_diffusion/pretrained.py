"""`from_pretrained(path)`: a latent-diffusion VAE from the files practitioners hold.

    from engine.models import from_pretrained
    vae = from_pretrained("sdxl/vae")                                   # diffusers folder
    vae = from_pretrained("sdxl_vae.safetensors", config="sdxl")        # LDM single file
    vae = from_pretrained("ae.safetensors")                             # FLUX (config "flux")
    vae = from_pretrained("taesd/")                                     # TAESD pair
    vae = from_pretrained("v1-5-pruned.safetensors", dtype="fp16")      # first_stage_model.*

What it reads (safetensors and JSON only; a pickle is refused with a conversion recipe):
  * a diffusers folder: config.json (`_class_name` AutoencoderKL or AutoencoderTiny) and
    diffusion_pytorch_model.safetensors (or .fp16.safetensors); a pipeline folder's vae/ too;
  * one .safetensors in the LDM/SGM layout (optionally under `first_stage_model.` or `vae.`,
    the other keys of a full checkpoint are skipped), or in diffusers' layout without config;
    its config comes from the shapes and a preset (configs.py: `config=` settles sd15/sdxl
    and flux/sd3, which have identical shapes);
  * TAESD's original pair `<name>_encoder.safetensors` + `<name>_decoder.safetensors`: the
    folder holding it, or either file.
The result is in eval mode, on `device`, in `precision.compute_dtype(dtype, force_upcast)`.
No released weights are reachable from the machines this was written on: the loaders are tested
on files that diffusers itself writes (tests/latent_diffusion).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from engine.models.latent_diffusion import layouts
from engine.models.latent_diffusion.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from engine.models.latent_diffusion.base import LatentDiffusionVAE
from engine.models.latent_diffusion.configs import (
    AnyConfig,
    architecture_of,
    from_diffusers_json,
    infer_kl,
    infer_tiny,
    resolve,
)
from engine.models.latent_diffusion.layouts import LayoutError
from engine.models.latent_diffusion.precision import compute_dtype
from engine.models.latent_diffusion.taesd import AutoencoderTiny, AutoencoderTinyConfig

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
PREFIXES = ("first_stage_model.", "vae.")  # full SD checkpoints; some single-file VAEs
TAESD_NAMES = {"taesdxl": "taesdxl", "taef1": "taef1", "taesd": "taesd"}  # file prefix -> preset
CONVERT = ("convert it to safetensors once, in an environment you trust (unpickling runs code):"
           "  import torch, safetensors.torch as st;"
           "  sd = torch.load('{path}', map_location='cpu', weights_only=True);"
           "  st.save_file({{k: v.contiguous() for k, v in sd.get('state_dict', sd).items()}},"
           " '{stem}.safetensors')")
MODEL_CLS = {AutoencoderKLConfig: AutoencoderKL, AutoencoderTinyConfig: AutoencoderTiny}


def refuse_pickle(path: Path) -> None:
    """Raise for a pickle-based file, with the recipe that converts it."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LayoutError(f"{path} is a pickle ({path.suffix}); this engine never unpickles:"
                          f" {CONVERT.format(path=path, stem=path.with_suffix(''))}")


def is_pretrained_path(path: str | os.PathLike) -> bool:
    """Whether `path` is for `from_pretrained` (a diffusers folder, a .safetensors VAE, a TAESD
    folder) rather than a vae-engine checkpoint or export directory."""
    p = Path(path)
    if p.is_file():
        return p.suffix == ".safetensors" and not (p.parent / "state.json").is_file()
    if not p.is_dir() or (p / "manifest.json").is_file() or (p / "state.json").is_file():
        return False
    if (p / "vae" / "config.json").is_file() or any(p.glob("*_encoder.safetensors")):
        return True
    try:
        return "_class_name" in json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None,
                    config: str | AnyConfig | None = None) -> LatentDiffusionVAE:
    """Load a latent-diffusion VAE (see the module docstring). `config`: a preset name
    (sd15, sdxl, sd3, flux, taesd, taesdxl, taef1) or a config object, for files without a
    config.json; `dtype`: float32 (default), float16 (fp32 when force_upcast) or bfloat16."""
    p = Path(path)
    if not p.exists():
        raise LayoutError(f"{p} does not exist; expected a diffusers VAE folder, a .safetensors"
                          " VAE file or a folder with a TAESD pair")
    cfg, state = _read(p, config)
    model = MODEL_CLS[type(cfg)](cfg)
    load_state(model, state, p)
    dtype = compute_dtype(dtype, cfg.force_upcast)
    return model.to(device=device or "cpu", dtype=dtype).eval()


def _read(p: Path, config: str | AnyConfig | None) -> tuple[AnyConfig, dict[str, Tensor]]:
    """(config, diffusers-layout state dict) of any supported path."""
    if p.is_dir():
        if (p / "config.json").is_file():
            return _read_diffusers(p, config)
        if (p / "vae" / "config.json").is_file():
            return _read_diffusers(p / "vae", config)
        return _read_taesd(_taesd_pair_in(p), config)
    refuse_pickle(p)
    if p.suffix != ".safetensors":
        raise LayoutError(f"cannot tell what {p} is: expected a .safetensors file, a diffusers"
                          " folder (config.json) or a folder with a TAESD pair")
    keys = safetensors_keys(p)
    if keys and all(k.partition(".")[0].isdigit() for k in keys):
        return _read_taesd(_taesd_pair_of(p), config)
    if p.name in WEIGHTS and (p.parent / "config.json").is_file():
        return _read_diffusers(p.parent, config, p)
    return _read_single_file(p, keys, config)


def safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise LayoutError(f"cannot read {path} as safetensors (truncated or not safetensors?):"
                          f" {e}") from e


def read_safetensors(path: Path, keys: list[str] | None = None) -> dict[str, Tensor]:
    """The tensors of `path` (only `keys` when given: a full SD checkpoint's VAE part)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (keys if keys is not None else f.keys())}
    except (SafetensorError, OSError) as e:
        raise LayoutError(f"cannot read {path} as safetensors (truncated?): {e}") from e


def _read_diffusers(folder: Path, config: str | AnyConfig | None, weights: Path | None = None
                    ) -> tuple[AnyConfig, dict[str, Tensor]]:
    where = folder / "config.json"
    try:
        data = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LayoutError(f"{where} is not valid JSON ({e})") from e
    if not isinstance(data, dict) or "_class_name" not in data:
        raise LayoutError(f"{where} is not a diffusers model config (no _class_name); a"
                          " vae-engine checkpoint loads with engine.checkpoint.load_model")
    weights = weights or _diffusers_weights(folder)
    cfg = config if not isinstance(config, str) and config is not None \
        else from_diffusers_json(data, str(where))
    if isinstance(config, str):  # the preset's scaling, the folder's architecture
        cfg = resolve(type(cfg), architecture_of(cfg), config, str(folder))
    return cfg, read_safetensors(weights)


def _diffusers_weights(folder: Path) -> Path:
    for name in WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    for pickle in folder.glob("diffusion_pytorch_model*.bin"):
        refuse_pickle(pickle)
    raise LayoutError(f"{folder} has a config.json but no {WEIGHTS[0]}")


def _read_single_file(p: Path, keys: list[str], config: str | AnyConfig | None
                      ) -> tuple[AnyConfig, dict[str, Tensor]]:
    """An LDM/SGM (or diffusers-layout) AutoencoderKL file; config from shapes + preset."""
    prefix = next((pre for pre in PREFIXES if any(k.startswith(pre + "decoder.") for k in keys)),
                  "")
    own = [k for k in keys if k.startswith(prefix)] if prefix else keys
    state = {k[len(prefix):]: v for k, v in read_safetensors(p, own).items()}
    if any(k.startswith("encoder.down_blocks.") for k in state):
        diffusers_state = state
    elif any(k.startswith("encoder.down.") for k in state):
        diffusers_state = layouts.ldm_to_diffusers(state)
    else:
        raise LayoutError(f"{p}: no VAE keys found (expected encoder.down.*, decoder.up.* in the"
                          f" LDM layout, optionally under {' or '.join(PREFIXES)}); first key:"
                          f" {keys[0] if keys else 'none'}")
    cfg = resolve(AutoencoderKLConfig, infer_kl(diffusers_state), config, str(p))
    return cfg, diffusers_state


# --- TAESD -------------------------------------------------------------------------------------
def _taesd_pair_in(folder: Path) -> tuple[Path, Path]:
    encoders = sorted(folder.glob("*_encoder.safetensors"))
    if len(encoders) != 1:
        found = [f.name for f in folder.iterdir()][:8]
        raise LayoutError(f"{folder}: expected a diffusers VAE folder (config.json) or exactly"
                          " one TAESD pair (<name>_encoder.safetensors,"
                          f" <name>_decoder.safetensors); found {found or 'nothing'}"
                          + ("; pass one of the files to pick a pair" if encoders else ""))
    return _taesd_pair_of(encoders[0])


def _taesd_pair_of(path: Path) -> tuple[Path, Path]:
    """(encoder file, decoder file) of the pair that `path` belongs to."""
    stem = path.name.removesuffix(".safetensors")
    for own, other in (("_encoder", "_decoder"), ("_decoder", "_encoder")):
        if stem.endswith(own):
            sibling = path.with_name(stem[: -len(own)] + other + ".safetensors")
            if not sibling.is_file():
                raise LayoutError(f"{path} is half of a TAESD pair; its other half {sibling.name}"
                                  " is missing: put both files in one folder")
            return (path, sibling) if own == "_encoder" else (sibling, path)
    raise LayoutError(f"{path} holds TAESD keys but is not named <name>_encoder.safetensors or"
                      " <name>_decoder.safetensors: rename it so its other half can be found")


def _read_taesd(pair: tuple[Path, Path], config: str | AnyConfig | None
                ) -> tuple[AnyConfig, dict[str, Tensor]]:
    state: dict[str, Tensor] = {}
    for path, part in zip(pair, ("encoder", "decoder")):
        half = read_safetensors(path)
        if layouts.taesd_part(half) != part:
            raise LayoutError(f"{path} is named as the TAESD {part} but holds the other half")
        state.update(layouts.taesd_to_diffusers(half, part))
    name = pair[0].name.split("_")[0].lower()
    config = config if config is not None else TAESD_NAMES.get(name)
    return resolve(AutoencoderTinyConfig, infer_tiny(state), config, str(pair[0].parent)), state


# --- loading -----------------------------------------------------------------------------------
def load_state(model: torch.nn.Module, state: dict[str, Tensor], where: Path) -> None:
    """Strict load; the first missing, unexpected or misshapen key is named in one line."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise LayoutError(f"{where}: missing key {missing[0]!r} ({len(missing)} missing in all)"
                          f" for a {type(model).__name__} with {_short(model.config)}")
    if unexpected:
        raise LayoutError(f"{where}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all)"
                          f" for a {type(model).__name__} with {_short(model.config)}")
    for key, t in state.items():
        if t.shape != expected[key].shape:
            raise LayoutError(f"{where}: {key!r} has shape {tuple(t.shape)}, the model expects"
                              f" {tuple(expected[key].shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LayoutError(f"{where}: {key!r} holds NaN or inf; the file is corrupt")
    model.load_state_dict(state)


def _short(cfg: Any) -> str:
    fields = ("block_out_channels", "encoder_block_out_channels", "latent_channels")
    return ", ".join(f"{f}={getattr(cfg, f)}" for f in fields if hasattr(cfg, f))
