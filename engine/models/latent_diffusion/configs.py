"""Configs of the latent-diffusion VAEs from what a file holds: diffusers' config.json, or the
tensor shapes of a state dict (diffusers layout) plus a preset for what shapes cannot tell.

Shapes give the architecture: channels per level, layers per block, latent channels, quant
convs, mid-block attention (and TAESD's stages). They cannot give `scaling_factor`,
`shift_factor`, `force_upcast` or `norm_num_groups`; those come from a preset:

    AutoencoderKL, 4 latent channels, quant convs      -> "sd15" (0.18215); SDXL's VAE has the
                                                          same shapes: pass config="sdxl"
    AutoencoderKL, 16 latent channels, no quant convs  -> "flux" (0.3611, shift 0.1159); SD3's
                                                          VAE has the same shapes: config="sd3"
    AutoencoderTiny, 4 / 16 latent channels            -> "taesd" / "taef1" (scaling 1, shift 0)

A named preset must agree with the shapes on the fields that tell the presets apart (IDENTITY);
a mismatch is one line that names the field, e.g. `config 'sd3' has latent_channels=16, the
weights in ... have 4`. The other architecture fields always come from the shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from engine.models.latent_diffusion.autoencoder_kl import (
    AUTOENCODER_KL_FAMILY,
    AutoencoderKLConfig,
)
from engine.models.latent_diffusion.layouts import LayoutError
from engine.models.latent_diffusion.taesd import AUTOENCODER_TINY_FAMILY, AutoencoderTinyConfig

PRESET_FIELDS = ("scaling_factor", "shift_factor", "force_upcast")  # what a preset supplies
# What tells the presets apart; a named preset must match the weights on these. The other
# architecture fields come from the shapes, so a preset's scaling applies to resized models too.
IDENTITY = ("latent_channels", "use_quant_conv", "use_post_quant_conv")
PRESETS = {**{n: AUTOENCODER_KL_FAMILY for n in AUTOENCODER_KL_FAMILY.presets},
           **{n: AUTOENCODER_TINY_FAMILY for n in AUTOENCODER_TINY_FAMILY.presets}}
CLASS_NAMES = {"AutoencoderKL": AutoencoderKLConfig, "AutoencoderTiny": AutoencoderTinyConfig}
# diffusers config.json entries that must hold this value for the architectures here.
REQUIRED = {
    AutoencoderKLConfig: {"act_fn": "silu", "down_block_types": "DownEncoderBlock2D",
                          "up_block_types": "UpDecoderBlock2D"},
    AutoencoderTinyConfig: {"act_fn": "relu", "upsample_fn": "nearest",
                            "upsampling_scaling_factor": 2},
}
AnyConfig = AutoencoderKLConfig | AutoencoderTinyConfig


def _require(state: dict[str, Tensor], key: str, what: str) -> Tensor:
    if key not in state:
        raise LayoutError(f"missing key {key!r}: not an {what} state dict")
    return state[key]


def _count(state: dict[str, Tensor], template: str) -> int:
    n = 0
    while template.format(n) in state:
        n += 1
    return n


def infer_kl(state: dict[str, Tensor]) -> dict[str, Any]:
    """Architecture fields of an AutoencoderKL from a diffusers-layout state dict's shapes."""
    what = "AutoencoderKL"
    levels = _count(state, "encoder.down_blocks.{}.resnets.0.conv1.weight")
    if levels == 0:
        _require(state, "encoder.down_blocks.0.resnets.0.conv1.weight", what)
    return {
        "in_channels": int(_require(state, "encoder.conv_in.weight", what).shape[1]),
        "out_channels": int(_require(state, "decoder.conv_out.weight", what).shape[0]),
        "block_out_channels": tuple(
            int(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
            for i in range(levels)),
        "layers_per_block": _count(state, "encoder.down_blocks.0.resnets.{}.conv1.weight"),
        "latent_channels": int(_require(state, "decoder.conv_in.weight", what).shape[1]),
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in state,
    }


def _tiny_layers(state: dict[str, Tensor], part: str) -> list[tuple[str, Tensor]]:
    """(kind, weight) per parameterized layer of `{part}.layers`, in order: kind is "conv" or
    "block" (a block's first conv weight stands for it)."""
    prefix = f"{part}.layers."
    indices = sorted({int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)})
    if not indices:
        raise LayoutError(f"no key starts with {prefix!r}: not an AutoencoderTiny state dict")
    out = []
    for i in indices:
        block = f"{prefix}{i}.conv.0.weight"
        kind = "block" if block in state else "conv"
        out.append((kind, state[block] if kind == "block" else
                    _require(state, f"{prefix}{i}.weight", "AutoencoderTiny")))
    return out


def infer_tiny(state: dict[str, Tensor]) -> dict[str, Any]:
    """Architecture fields of an AutoencoderTiny from a diffusers-layout state dict's shapes:
    encoder = conv, blocks, (stride-2 conv, blocks)*, conv; decoder = conv, (blocks, conv)*."""
    enc, dec = _tiny_layers(state, "encoder"), _tiny_layers(state, "decoder")
    enc_stages: list[list[Tensor]] = []
    for kind, w in enc[:-1]:
        if kind == "conv":
            enc_stages.append([w])
        elif enc_stages:
            enc_stages[-1].append(w)
    dec_stages: list[list[Tensor]] = [[]]
    for kind, w in dec[1:]:
        dec_stages[-1].append(w)
        if kind == "conv":
            dec_stages.append([])
    dec_stages = [s for s in dec_stages if s]
    return {
        "in_channels": int(enc[0][1].shape[1]), "out_channels": int(dec[-1][1].shape[0]),
        "encoder_block_out_channels": tuple(int(s[0].shape[0]) for s in enc_stages),
        "num_encoder_blocks": tuple(len(s) - 1 for s in enc_stages),
        "decoder_block_out_channels": tuple(int(s[-1].shape[1]) for s in dec_stages),
        "num_decoder_blocks": tuple(len(s) - 1 for s in dec_stages),
        "latent_channels": int(dec[0][1].shape[1]),
    }


def architecture_of(cfg: AnyConfig) -> dict[str, Any]:
    """Every field of a config but those a preset supplies (PRESET_FIELDS)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in PRESET_FIELDS}


def default_preset(config_cls: type, arch: dict[str, Any]) -> str:
    """The preset whose scaling applies when the user names none (see the module doc)."""
    if config_cls is AutoencoderTinyConfig:
        return "taef1" if arch["latent_channels"] == 16 else "taesd"
    return "flux" if arch["latent_channels"] == 16 else "sd15"


def resolve(config_cls: type, arch: dict[str, Any], config: str | AnyConfig | None,
            where: str) -> AnyConfig:
    """The config of weights with architecture `arch`: `config` itself when it is a config
    object, else the preset (named, or the default for the shapes) with `arch` filled in."""
    if isinstance(config, (AutoencoderKLConfig, AutoencoderTinyConfig)):
        if type(config) is not config_cls:
            raise LayoutError(f"{where} holds an {config_cls.__name__[:-6]}, not the"
                              f" {type(config).__name__[:-6]} that config= describes")
        return config
    name = config or default_preset(config_cls, arch)
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; valid: {', '.join(PRESETS)}")
    family = PRESETS[name]
    if family.config_cls is not config_cls:
        fits = ", ".join(p for p, f in PRESETS.items() if f.config_cls is config_cls)
        raise LayoutError(f"config {name!r} is an {family.name} preset, but {where} holds an"
                          f" {config_cls.__name__[:-6]}; use one of {fits}")
    preset = family.config_cls(**family.presets[name])
    if config is not None:
        for field in (f for f in IDENTITY if hasattr(preset, f)):
            value = arch.get(field, getattr(preset, field))
            if getattr(preset, field) != value:
                raise LayoutError(f"config {name!r} has {field}={getattr(preset, field)}, the"
                                  f" weights in {where} have {value}; pick another --config")
    return dataclasses.replace(preset, **arch)


def from_diffusers_json(data: dict[str, Any], where: str) -> AnyConfig:
    """Our config from diffusers' config.json (AutoencoderKL or AutoencoderTiny)."""
    name = data.get("_class_name")
    if name not in CLASS_NAMES:
        raise LayoutError(f"{where}: _class_name is {name!r}; this loader reads"
                          f" {' and '.join(CLASS_NAMES)}")
    config_cls = CLASS_NAMES[name]
    for key, value in REQUIRED[config_cls].items():
        got = data.get(key, value)
        values = got if isinstance(got, (list, tuple)) else [got]
        if any(v != value for v in values):
            raise LayoutError(f"{where}: {key}={got!r} is not supported (only {value!r})")
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
    if values.get("shift_factor", 0.0) is None:
        values["shift_factor"] = 0.0
    return config_cls(**values)
