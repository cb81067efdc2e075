"""Summarise a leave-one-class-out anomaly sweep: `python -m engine.anomaly REPORT.json ...`.

    python -m engine.anomaly runs/no*/anomaly.json --json summary.json --markdown summary.md

Each REPORT is the `--out` of `python -m engine.evaluate CKPT --anomaly --holdout-class C`; the
scores and ROC-AUC live in engine.analysis.anomaly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.analysis.anomaly import markdown_table, summarize


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.anomaly REPORT.json ... --json OUT --markdown OUT`: sweep summary."""
    p = argparse.ArgumentParser(prog="python -m engine.anomaly", description=main.__doc__)
    p.add_argument("reports", nargs="+", help="engine.evaluate --anomaly --out files")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    try:
        reports = [json.loads(Path(r).read_text()) for r in args.reports]
        if any("anomaly" not in r for r in reports):
            raise ValueError("every report must come from engine.evaluate --anomaly")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarize(reports)
    table = markdown_table(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
