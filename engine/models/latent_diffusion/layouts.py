"""State-dict layouts of the latent-diffusion VAEs, and the maps between them.

Three layouts exist in the wild; the models here use diffusers', the other two are renamed on
load (and written back by the inverse maps, which the tests use):

1. diffusers (`diffusion_pytorch_model.safetensors`): the module tree of autoencoder_kl.py.
2. Original LDM / SGM, as A1111 and ComfyUI hold single files (`vae-ft-mse-840000-ema-pruned`,
   `sdxl_vae`, FLUX's `ae`), possibly under `first_stage_model.` inside a full checkpoint:

       LDM                                      diffusers
       {s}.norm_out.*                           {s}.conv_norm_out.*
       encoder.down.{i}.block.{j}.*             encoder.down_blocks.{i}.resnets.{j}.*
       encoder.down.{i}.downsample.conv.*       encoder.down_blocks.{i}.downsamplers.0.conv.*
       decoder.up.{n-1-i}.block.{j}.*           decoder.up_blocks.{i}.resnets.{j}.*
       decoder.up.{n-1-i}.upsample.conv.*       decoder.up_blocks.{i}.upsamplers.0.conv.*
       {s}.mid.block_1.* / block_2.*            {s}.mid_block.resnets.0.* / resnets.1.*
       {s}.mid.attn_1.{norm,q,k,v,proj_out}.*   {s}.mid_block.attentions.0.{group_norm,to_q,
                                                to_k,to_v,to_out.0}.*
       ...nin_shortcut.*                        ...conv_shortcut.*
       ({s} = encoder | decoder; conv_in, conv_out, quant_conv, post_quant_conv keep their names)

   LDM numbers the decoder's levels from the finest (up.0 is the last applied), diffusers from
   the first applied, hence n-1-i. LDM's attention projections are 1x1 convs, weights
   (C, C, 1, 1); diffusers' are Linear layers, (C, C).
3. TAESD's originals (`taesd_encoder.safetensors`, `taesd_decoder.safetensors`): the weights of
   two nn.Sequential, keys `{index}.{rest}`. The encoder's indices are diffusers'
   `encoder.layers.{index}`; the decoder's Sequential starts with a Clamp that has no
   parameters, so its index k is diffusers' `decoder.layers.{k-1}`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import Tensor

TRAINING_ONLY = ("loss.", "model_ema.")  # LDM training state in some files: ignored on load


class LayoutError(ValueError):
    """A state dict whose keys or shapes fit no known layout."""


# (LDM pattern, diffusers pattern). {u} on the LDM side is n-1-{i} on the diffusers side.
_PAIRS = (
    ("{s}.conv_in.{t}", "{s}.conv_in.{t}"),
    ("{s}.conv_out.{t}", "{s}.conv_out.{t}"),
    ("{s}.norm_out.{t}", "{s}.conv_norm_out.{t}"),
    ("encoder.down.{i}.block.{j}.{r}.{t}", "encoder.down_blocks.{i}.resnets.{j}.{r}.{t}"),
    ("encoder.down.{i}.downsample.conv.{t}", "encoder.down_blocks.{i}.downsamplers.0.conv.{t}"),
    ("decoder.up.{u}.block.{j}.{r}.{t}", "decoder.up_blocks.{i}.resnets.{j}.{r}.{t}"),
    ("decoder.up.{u}.upsample.conv.{t}", "decoder.up_blocks.{i}.upsamplers.0.conv.{t}"),
    ("{s}.mid.block_1.{r}.{t}", "{s}.mid_block.resnets.0.{r}.{t}"),
    ("{s}.mid.block_2.{r}.{t}", "{s}.mid_block.resnets.1.{r}.{t}"),
    ("{s}.mid.attn_1.{a}.{t}", "{s}.mid_block.attentions.0.{a}.{t}"),
    ("quant_conv.{t}", "quant_conv.{t}"),
    ("post_quant_conv.{t}", "post_quant_conv.{t}"),
)
# Placeholder values that differ between the layouts (LDM -> diffusers); others are equal.
_RENAME = {
    "r": {"nin_shortcut": "conv_shortcut"},
    "a": {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"},
}
_GROUP = {"s": "encoder|decoder", "i": r"\d+", "j": r"\d+", "u": r"\d+", "t": "weight|bias",
          "r": "norm1|conv1|norm2|conv2|nin_shortcut|conv_shortcut",
          "a": r"norm|q|k|v|proj_out|group_norm|to_q|to_k|to_v|to_out\.0"}
ATTENTION_PROJECTIONS = ("q", "k", "v", "proj_out")


def _regex(pattern: str) -> re.Pattern[str]:
    escaped = re.escape(pattern).replace(r"\{", "{").replace(r"\}", "}")
    return re.compile("^" + re.sub(r"{(\w)}", lambda m: f"(?P<{m[1]}>{_GROUP[m[1]]})",
                                   escaped) + "$")


# (regex of the source name, target pattern, value renames, placeholder carrying the level
# that flips between the layouts) per direction.
_BACK = {k: {v: o for o, v in table.items()} for k, table in _RENAME.items()}
_TO_DIFFUSERS = [(_regex(ldm), diff, _RENAME, "u" if "{u}" in ldm else "") for ldm, diff in _PAIRS]
_TO_LDM = [(_regex(diff), ldm, _BACK, "i" if "{u}" in ldm else "") for ldm, diff in _PAIRS]


def _flip(groups: dict[str, str], src: str, levels: int) -> dict[str, str]:
    """Swap {u} (LDM's decoder level) and {i} (diffusers'): i = n - 1 - u."""
    other = {"u": "i", "i": "u"}[src]
    return {**groups, other: str(levels - 1 - int(groups[src]))}


def _translate(key: str, levels: int, rules: list) -> str | None:
    for regex, target, rename, flip in rules:
        m = regex.match(key)
        if m is not None:
            groups = {k: rename.get(k, {}).get(v, v) for k, v in m.groupdict().items()}
            return target.format(**(_flip(groups, flip, levels) if flip else groups))
    return None


def ldm_to_diffusers_key(key: str, levels: int) -> str:
    """The diffusers name of an LDM key of a VAE with `levels` resolution levels."""
    name = _translate(key, levels, _TO_DIFFUSERS)
    if name is None:
        raise LayoutError(f"key {key!r} matches no LDM VAE key (expected names like"
                          " encoder.down.0.block.0.norm1.weight or decoder.mid.attn_1.q.weight)")
    return name


def diffusers_to_ldm_key(key: str, levels: int) -> str:
    """The LDM name of a diffusers AutoencoderKL key (the inverse of ldm_to_diffusers_key)."""
    name = _translate(key, levels, _TO_LDM)
    if name is None:
        raise LayoutError(f"key {key!r} is not an AutoencoderKL parameter name")
    return name


def ldm_levels(keys: list[str] | set[str], prefix: str = "encoder.down.") -> int:
    """Resolution levels of a state dict: 1 + the largest level index under `prefix`."""
    found = [int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)]
    if not found:
        raise LayoutError(f"no key starts with {prefix!r}: not an AutoencoderKL state dict")
    return max(found) + 1


def _is_attention_weight(ldm_key: str) -> bool:
    parts = ldm_key.split(".")
    return ".mid.attn_1." in ldm_key and parts[-2] in ATTENTION_PROJECTIONS \
        and parts[-1] == "weight"


def ldm_to_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An LDM VAE state dict (prefix already stripped) in diffusers' layout."""
    state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}
    levels = ldm_levels(set(state))
    out = {}
    for key, tensor in state.items():
        if _is_attention_weight(key) and tensor.dim() == 4:
            tensor = tensor[:, :, 0, 0]  # 1x1 conv (C, C, 1, 1) -> Linear (C, C)
        out[ldm_to_diffusers_key(key, levels)] = tensor
    return out


def diffusers_to_ldm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL state dict in the LDM layout (attention weights as 1x1 convs)."""
    levels = ldm_levels(set(state), "encoder.down_blocks.")
    out = {}
    for key, tensor in state.items():
        ldm = diffusers_to_ldm_key(key, levels)
        out[ldm] = tensor[:, :, None, None] if _is_attention_weight(ldm) else tensor
    return out


# --- TAESD -----------------------------------------------------------------------------------
TAESD_OFFSET = {"encoder": 0, "decoder": 1}  # original Sequential index - diffusers index


def _shift_indices(state: dict[str, Tensor], rename: Callable[[int, str], str]
                   ) -> dict[str, Tensor]:
    out = {}
    for key, tensor in state.items():
        head, _, rest = key.partition(".")
        if not head.isdigit() or not rest:
            raise LayoutError(f"key {key!r} is not a TAESD key (expected '<index>.<name>', e.g."
                              " 1.conv.0.weight)")
        out[rename(int(head), rest)] = tensor
    return out


def taesd_to_diffusers(state: dict[str, Tensor], part: str) -> dict[str, Tensor]:
    """One original TAESD file (part "encoder" or "decoder") -> diffusers' `{part}.layers.*`."""
    offset = TAESD_OFFSET[part]

    def rename(index: int, rest: str) -> str:
        if index < offset:
            raise LayoutError(f"key {index}.{rest}: the original TAESD {part} has no parameters"
                              f" at index {index} (its Clamp)")
        return f"{part}.layers.{index - offset}.{rest}"

    return _shift_indices(state, rename)


def diffusers_to_taesd(state: dict[str, Tensor], part: str) -> dict[str, Tensor]:
    """diffusers' `{part}.layers.*` -> the original TAESD file's keys (the inverse map)."""
    prefix, offset = f"{part}.layers.", TAESD_OFFSET[part]
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return _shift_indices(own, lambda index, rest: f"{index + offset}.{rest}")


def taesd_part(state: dict[str, Tensor]) -> str:
    """Which half of TAESD an original file holds: the decoder has no index 0 (the Clamp)."""
    heads = {k.partition(".")[0] for k in state}
    if not heads or not all(h.isdigit() for h in heads):
        raise LayoutError("not a TAESD file: keys must start with a layer index, e.g."
                          " 0.weight, 1.conv.0.weight")
    return "encoder" if "0" in heads else "decoder"
