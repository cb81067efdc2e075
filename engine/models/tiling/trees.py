"""Read an autoencoder's module tree into the list of layers a tiled schedule runs.

AutoencoderKL (diffusers' attribute names; ours in engine.models has the same tree):

  decode: [post_quant_conv] conv_in | mid_block: resnets[0], attentions[0], resnets[1] |
          up_blocks[i]: resnets[j]..., upsamplers[0].conv after nearest 2x |
          conv_norm_out + conv_act + conv_out
  encode: conv_in | down_blocks[i]: resnets[j]..., downsamplers[0].conv after F.pad(0, 1, 0, 1)
          (when its padding is 0) | mid_block | conv_norm_out + conv_act + conv_out | [quant_conv]

AutoencoderTiny (TAESD): encoder.layers / decoder.layers are Sequentials of Conv2d, pointwise
activations, nn.Upsample (nearest) and blocks with `conv` (a Sequential), `skip` and `fuse`. The
encoder maps its input from [-1, 1] to [0, 1] first; the decoder clamps its input with
3 tanh(z / 3) and maps its output from [0, 1] to [-1, 1]. All of these are pointwise.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from engine.models.tiling.geometry import ConvSpec
from engine.models.tiling.layers import (
    POINTWISE_MODULES,
    AttentionLayer,
    ConvLayer,
    Layer,
    ResnetLayer,
    TinyBlockLayer,
    activation_of,
    compose,
    with_post,
    with_pre,
)

DOWNSAMPLE_PAD = (0, 1, 0, 1)  # (left, right, top, bottom): Downsample2D's pad when padding=0


def model_kind(model: nn.Module) -> str:
    """'kl' for an AutoencoderKL tree, 'tiny' for an AutoencoderTiny tree."""
    enc, dec = getattr(model, "encoder", None), getattr(model, "decoder", None)
    if hasattr(enc, "down_blocks") and hasattr(dec, "up_blocks"):
        return "kl"
    if hasattr(enc, "layers") and hasattr(dec, "layers"):
        return "tiny"
    raise ValueError(f"tiling expects an AutoencoderKL tree (encoder.down_blocks, "
                     f"decoder.up_blocks) or an AutoencoderTiny tree (encoder.layers, "
                     f"decoder.layers); got {type(model).__name__}")


def _mid_layers(mid: nn.Module) -> list[Layer]:
    """resnets[0], then (attentions[i], resnets[i + 1]) pairs. Without attention, diffusers
    keeps `attentions = [None]` and our MidBlock an empty list: both mean "no attention"."""
    layers: list[Layer] = [ResnetLayer(mid.resnets[0])]
    attentions = list(mid.attentions) or [None] * (len(mid.resnets) - 1)
    for attn, resnet in zip(attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            layers.append(AttentionLayer(attn))
        layers.append(ResnetLayer(resnet))
    return layers


def _resampler(block: nn.Module, name: str) -> nn.Module | None:
    samplers = getattr(block, name, None)
    if not samplers:
        return None
    sampler = samplers[0]
    if getattr(sampler, "norm", None) is not None or getattr(sampler, "conv", None) is None:
        raise ValueError(f"tiling supports {name} that are a plain conv, got {sampler}")
    return sampler


def _output_conv(coder: nn.Module) -> ConvLayer:
    return ConvLayer(ConvSpec.of(coder.conv_out), coder.conv_norm_out,
                     activation_of(coder, "conv_act"))


def kl_decoder_layers(model: nn.Module) -> list[Layer]:
    """The decoder of an AutoencoderKL tree, post_quant_conv first, as tiled layers."""
    dec = model.decoder
    layers: list[Layer] = []
    if getattr(model, "post_quant_conv", None) is not None:
        layers.append(ConvLayer(ConvSpec.of(model.post_quant_conv)))
    layers.append(ConvLayer(ConvSpec.of(dec.conv_in)))
    layers += _mid_layers(dec.mid_block)
    for block in dec.up_blocks:
        layers += [ResnetLayer(r) for r in block.resnets]
        if (sampler := _resampler(block, "upsamplers")) is not None:
            layers.append(ConvLayer(ConvSpec.of(sampler.conv), up=2))
    return layers + [_output_conv(dec)]


def kl_encoder_layers(model: nn.Module) -> list[Layer]:
    """The encoder of an AutoencoderKL tree, quant_conv last, as tiled layers."""
    enc = model.encoder
    layers: list[Layer] = [ConvLayer(ConvSpec.of(enc.conv_in))]
    for block in enc.down_blocks:
        layers += [ResnetLayer(r) for r in block.resnets]
        if (sampler := _resampler(block, "downsamplers")) is not None:
            pad = DOWNSAMPLE_PAD if tuple(sampler.conv.padding) == (0, 0) else (0, 0, 0, 0)
            layers.append(ConvLayer(ConvSpec.of(sampler.conv, pad)))
    layers += _mid_layers(enc.mid_block)
    layers.append(_output_conv(enc))
    if getattr(model, "quant_conv", None) is not None:
        layers.append(ConvLayer(ConvSpec.of(model.quant_conv)))
    return layers


def _upsample_factor(module: nn.Upsample, where: str) -> int:
    factor = module.scale_factor
    factor = factor[0] if isinstance(factor, tuple) else factor
    if module.mode != "nearest" or factor is None or float(factor) != int(factor):
        raise ValueError(f"tiling supports nearest upsampling by an integer factor, got "
                         f"{module} at {where}")
    return int(factor)


def sequential_layers(seq: nn.Sequential, where: str) -> list[Layer]:
    """A Sequential of convs, pointwise activations, nearest Upsample and tiny blocks."""
    layers: list[Layer] = []
    pre, up = None, 1
    for i, module in enumerate(seq):
        name = f"{where}[{i}]"
        if isinstance(module, nn.Conv2d):
            layers.append(ConvLayer(ConvSpec.of(module), act=pre, up=up))
            pre, up = None, 1
        elif isinstance(module, POINTWISE_MODULES):
            if layers and isinstance(layers[-1], ConvLayer) and up == 1:
                layers[-1] = replace(layers[-1], post=compose(layers[-1].post, module))
            else:
                pre = compose(pre, module)
        elif isinstance(module, nn.Upsample):
            up *= _upsample_factor(module, name)
        elif all(hasattr(module, a) for a in ("conv", "skip", "fuse")) and pre is None and up == 1:
            layers.append(_tiny_block(module, name))
        else:
            raise ValueError(f"tiling cannot walk {name} ({type(module).__name__}): expected "
                             "Conv2d, a pointwise activation, nearest Upsample or a tiny block")
    if pre is not None or up != 1:
        raise ValueError(f"{where} ends with an activation or upsample that follows no conv")
    return layers


def _tiny_block(block: nn.Module, where: str) -> TinyBlockLayer:
    convs = sequential_layers(block.conv, f"{where}.conv")
    if not convs or not all(isinstance(c, ConvLayer) for c in convs):
        raise ValueError(f"{where}.conv must be a Sequential of convs and activations")
    skip = None if isinstance(block.skip, nn.Identity) else ConvSpec.of(block.skip)
    return TinyBlockLayer(tuple(convs), skip, block.fuse)


def _to_unit(t: Tensor) -> Tensor:
    return t.add(1).div(2)  # [-1, 1] -> [0, 1]


def _from_unit(t: Tensor) -> Tensor:
    return t.mul(2).sub(1)  # [0, 1] -> [-1, 1]


def _soft_clamp(t: Tensor) -> Tensor:
    return torch.tanh(t / 3) * 3


def tiny_decoder_layers(model: nn.Module) -> list[Layer]:
    layers = sequential_layers(model.decoder.layers, "decoder.layers")
    return with_post(with_pre(layers, _soft_clamp), _from_unit)


def tiny_encoder_layers(model: nn.Module) -> list[Layer]:
    return with_pre(sequential_layers(model.encoder.layers, "encoder.layers"), _to_unit)
