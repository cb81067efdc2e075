"""Model registry: families (config class + model class) and named presets.

    build_model("mlp")                      # the family's default preset
    build_model("conv", preset="conv-fmnist", latent_dim=2)
    model_from_config({"family": "conv", ...})   # what a checkpoint's config.json holds

Lookups are exact; an unknown name raises a ValueError that lists the valid names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from engine.models import conv, crystal, mlp, vq
from engine.models.base import Family
from engine.models.latent_diffusion.autoencoder_kl import AUTOENCODER_KL_FAMILY
from engine.models.latent_diffusion.taesd import AUTOENCODER_TINY_FAMILY


def _table(*families: Family) -> dict[str, Family]:
    table: dict[str, Family] = {}
    for family in families:
        if family.name in table:
            raise ValueError(f"model family {family.name!r} is listed twice")
        table[family.name] = family
    return table


# The one list of families. A new family module defines its `Family` and is added here.
FAMILIES: dict[str, Family] = _table(
    mlp.MLP_FAMILY,
    mlp.CVAE_MLP_FAMILY,
    conv.CONV_FAMILY,
    conv.CVAE_CONV_FAMILY,
    vq.VQVAE_FAMILY,
    crystal.CRYSTAL_FAMILY,
    AUTOENCODER_KL_FAMILY,
    AUTOENCODER_TINY_FAMILY,
)


def _presets(families: dict[str, Family]) -> dict[str, tuple[str, dict[str, Any]]]:
    presets: dict[str, tuple[str, dict[str, Any]]] = {}
    for family in families.values():
        for preset, overrides in family.presets.items():
            if preset in presets:
                raise ValueError(f"preset {preset!r} is defined by two families")
            presets[preset] = (family.name, overrides)
    return presets


PRESETS: dict[str, tuple[str, dict[str, Any]]] = _presets(FAMILIES)  # preset -> (family, overrides)


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def list_presets() -> dict[str, str]:
    """Every preset name -> its family."""
    return {name: family for name, (family, _) in PRESETS.items()}


def presets_for(family: str) -> list[str]:
    return [p for p, (f, _) in PRESETS.items() if f == family]


def resolve_preset(family: str, preset: str | None) -> dict[str, Any]:
    fam = get_family(family)
    name = preset or fam.default_preset
    if name not in PRESETS or PRESETS[name][0] != family:
        raise ValueError(
            f"unknown preset {name!r} for model {family!r}; valid presets:"
            f" {', '.join(presets_for(family))}"
        )
    return dict(PRESETS[name][1])


def training_recipe(family: str, preset: str | None = None) -> dict[str, Any]:
    """The training flags (argparse destinations -> values) recorded for `preset`."""
    fam = get_family(family)
    name = preset or fam.default_preset
    resolve_preset(family, name)  # validates the name
    return dict(fam.recipes.get(name, {}))


def make_config(family: str, preset: str | None = None, **overrides: Any) -> Any:
    """The frozen config of `family` from `preset`, with `overrides` (None values ignored)."""
    fam = get_family(family)
    fields = {f.name for f in dataclasses.fields(fam.config_cls)}
    values = resolve_preset(family, preset)
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in fields:
            raise ValueError(
                f"{family} config has no field {key!r}; valid fields: {', '.join(sorted(fields))}"
            )
        values[key] = value
    return fam.config_cls(**values)


def build_model(family: str, preset: str | None = None, **overrides: Any) -> nn.Module:
    config = make_config(family, preset, **overrides)
    return get_family(family).model_cls(config)


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict with the family name, so the config alone rebuilds the model."""
    family = next(f.name for f in FAMILIES.values() if type(config) is f.config_cls)
    return {"family": family, **dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> Any:
    data = dict(data)
    family = data.pop("family", None)
    if family is None:
        raise ValueError("model config has no 'family' key; expected one written by vae-engine")
    fam = get_family(family)
    fields = {f.name: f for f in dataclasses.fields(fam.config_cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{family} config has unknown fields {sorted(unknown)}")
    # JSON turns tuples into lists; frozen configs keep tuples so they stay hashable.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return fam.config_cls(**values)


def model_from_config(data: dict[str, Any]) -> nn.Module:
    config = config_from_dict(data)
    return get_family(data["family"]).model_cls(config)
