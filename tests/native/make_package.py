"""Build a small AOTInductor decoder package for the native-runner tests.

    python tests/native/make_package.py OUT.pt2 [--hidden 64] [--latent 8] [--classes 0] [--seed 0]

Prefers `python -m export.aoti` when it exists (the project's exporter); until then it exports
an MLP decoder (engine.models.build_model("mlp") -> DecoderView) itself, with a dynamic batch
and the metadata keys that `vae_sample` reads: latent_shape, output_shape, conditional,
num_classes (comma-separated shapes without the batch, e.g. "8" and "1,28,28").
"""

from __future__ import annotations

import argparse
import sys

import torch


def metadata_for(model) -> dict[str, str]:
    return {
        "latent_shape": ",".join(map(str, model.latent_shape)),
        "output_shape": ",".join(map(str, model.data_shape)),
        "conditional": "1" if model.conditional else "0",
        "num_classes": str(getattr(model.config, "num_classes", 0)),
    }


def export_decoder(model, out: str) -> str:
    """torch.export the decoder view with a dynamic batch and AOT-compile it into `out`."""
    from torch._inductor import aoti_compile_and_package

    from engine.models.export_wrappers import DecoderView

    view = DecoderView(model.eval())
    z = torch.randn(2, *model.latent_shape)
    args: tuple = (z,)
    shapes: tuple = ({0: torch.export.Dim("batch", min=1, max=65536)},)
    if model.conditional:
        args += (torch.randint(model.config.num_classes, (2,)),)
        shapes += ({0: shapes[0][0]},)
    with torch.no_grad():
        ep = torch.export.export(view, args, dynamic_shapes=shapes)
        return aoti_compile_and_package(
            ep, package_path=out,
            inductor_configs={"aot_inductor.metadata": metadata_for(model)},
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--latent", type=int, default=8)
    p.add_argument("--classes", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from engine.models import build_model

    torch.manual_seed(a.seed)
    model = build_model("mlp", hidden_dims=(a.hidden,), latent_dim=a.latent,
                        num_classes=a.classes)
    print(export_decoder(model, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
