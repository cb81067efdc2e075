"""Model registry: families (config class + model class) and named presets.

    build_model("mlp")                      # the family's default preset
    build_model("conv", preset="conv-fmnist", latent_dim=2)
    model_from_config({"family": "conv", ...})   # what a checkpoint's config.json holds

Lookups are exact; an unknown name raises a ValueError that lists the valid names.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: type[nn.Module]
    default_preset: str


FAMILIES: dict[str, Family] = {}
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {}  # preset name -> (family, config overrides)


def register_family(
    name: str, config_cls: type, model_cls: type[nn.Module], presets: dict[str, dict[str, Any]]
) -> None:
    """Register a family and its presets; the first preset is the family's default."""
    if name in FAMILIES:
        raise ValueError(f"model family {name!r} is registered twice")
    FAMILIES[name] = Family(name, config_cls, model_cls, default_preset=next(iter(presets)))
    for preset, overrides in presets.items():
        if preset in PRESETS:
            raise ValueError(f"preset {preset!r} is registered twice")
        PRESETS[preset] = (name, overrides)


def _ensure_registered() -> None:
    # Importing the family modules registers them (kept lazy so `registry` has no cycles).
    from engine.models import conv, mlp, vq  # noqa: F401

    with contextlib.suppress(ImportError):  # the crystal family needs no extra at import
        from engine.models import crystal  # noqa: F401


def get_family(name: str) -> Family:
    _ensure_registered()
    if name not in FAMILIES:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def list_presets() -> dict[str, str]:
    """Every preset name -> its family."""
    _ensure_registered()
    return {name: family for name, (family, _) in PRESETS.items()}


def presets_for(family: str) -> list[str]:
    _ensure_registered()
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
