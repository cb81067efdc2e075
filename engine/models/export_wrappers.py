"""Export views of a model: small deterministic modules with plain tensor inputs and outputs.

No random op ever enters a graph: the noise of sampling stays outside (z is an input), because
TensorRT ignores RandomNormal's seed. Labels of conditional models are int64 inputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ExportPart:
    """One graph to export: a module, example inputs, and their names and dynamic axes."""

    module: nn.Module
    example_inputs: tuple[Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    # input name -> {axis index: axis name}; the batch axis is always dynamic. A name of the
    # form "base*k" is k times the axis "base" (e.g. image height = 8 * latent height).
    dynamic_axes: dict[str, dict[int, str]]
    description: str = ""
    # Parity-check overrides: batch sizes (None: the exporter's default) and further example
    # inputs at other sizes of the dynamic non-batch axes (e.g. a second resolution).
    parity_batches: tuple[int, ...] | None = None
    parity_examples: tuple[tuple[Tensor, ...], ...] = ()


BATCH = {0: "batch"}


class DecoderView(nn.Module):
    """z (B, *latent) [, y (B,)] -> images (B, *data_shape), output activation applied."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return self.model.output_activation(self.model._decode_logits(z, y))


class EncoderView(nn.Module):
    """x (B, *data_shape) [, y (B,)] -> (mu, logvar), each (B, *latent)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.model._encode_params(x, y)


class CodeDecoderView(nn.Module):
    """VQ codes (B, h, w) int64 -> images (B, C, S, S)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, codes: Tensor) -> Tensor:
        z_q = self.model.quantizer.codebook[codes].permute(0, 3, 1, 2)  # (B, D, h, w)
        return self.model.output_activation(self.model.decoder(z_q))


class CodeEncoderView(nn.Module):
    """images (B, C, S, S) -> VQ codes (B, h, w) int64.

    argmin_k ||x - e_k||^2 = argmin_k (||e_k||^2 - 2 x . e_k), written with matmul: `cdist`
    does not export to ONNX (pytorch #69201) and the Triton kernel is not traceable.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        z_e = self.model.encoder(x).permute(0, 2, 3, 1)  # (B, h, w, D)
        codebook = self.model.quantizer.codebook  # (K, D)
        scores = codebook.pow(2).sum(1) - 2 * z_e @ codebook.t()  # (B, h, w, K)
        return scores.argmin(-1)


def _label_example(model: nn.Module, batch: int) -> tuple[Tensor, ...]:
    if not model.conditional:
        return ()
    return (torch.randint(model.config.num_classes, (batch,)),)


def image_vae_parts(model: nn.Module, batch: int = 2) -> dict[str, ExportPart]:
    cond = model.conditional
    labels = _label_example(model, batch)
    names = ("y",) if cond else ()
    axes = {"y": BATCH} if cond else {}
    z = torch.randn(batch, *model.latent_shape)
    x = torch.rand(batch, *model.data_shape)
    return {
        "decoder": ExportPart(DecoderView(model), (z, *labels), ("z", *names), ("images",),
                              {"z": BATCH, **axes}, "latent z -> images"),
        "encoder": ExportPart(EncoderView(model), (x, *labels), ("images", *names),
                              ("mu", "logvar"), {"images": BATCH, **axes},
                              "images -> posterior mean and log-variance"),
    }


def vq_parts(model: nn.Module, batch: int = 2) -> dict[str, ExportPart]:
    codes = torch.randint(model.config.num_codes, (batch, *model.code_shape))
    x = torch.rand(batch, *model.data_shape)
    return {
        "decoder": ExportPart(CodeDecoderView(model), (codes,), ("codes",), ("images",),
                              {"codes": BATCH}, "codes -> images"),
        "encoder": ExportPart(CodeEncoderView(model), (x,), ("images",), ("codes",),
                              {"images": BATCH}, "images -> codes"),
    }


class CastView(nn.Module):
    """Runs an export view in `dtype` (fp16/bf16) while its float inputs and outputs stay fp32:
    the casts sit at the graph boundary, so runtimes feed and read the same tensors at any
    precision. Integer inputs (labels, codes) and outputs (codes) pass through unchanged."""

    def __init__(self, view: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.view = copy.deepcopy(view).to(dtype)
        self.dtype = dtype

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        cast = tuple(t.to(self.dtype) if t.is_floating_point() else t for t in inputs)
        out = self.view(*cast)
        if isinstance(out, Tensor):
            return out.float() if out.is_floating_point() else out
        return tuple(t.float() if t.is_floating_point() else t for t in out)
