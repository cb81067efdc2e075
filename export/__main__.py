"""`python -m export {onnx,aoti,tensorrt,triton} ...`: the exporters behind one entry point."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"onnx": "export.onnx", "aoti": "export.aoti", "tensorrt": "export.tensorrt",
            "triton": "export.triton"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m export {{{','.join(COMMANDS)}}} ARGS... (see each --help)",
              file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
