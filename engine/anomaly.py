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
from engine.checkpoint import atomic_write_bytes, describe_os_error


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.anomaly REPORT.json ... --json OUT --markdown OUT`: sweep summary."""
    p = argparse.ArgumentParser(prog="python -m engine.anomaly", description=main.__doc__)
    p.add_argument("reports", nargs="+", help="engine.evaluate --anomaly --out files")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    try:
        reports = [json.loads(Path(r).read_text()) for r in args.reports]
        for path, report in zip(args.reports, reports):
            try:  # each one alone, so that the error names the file
                summarize([report])
            except (KeyError, TypeError, IndexError, ValueError, ZeroDivisionError) as e:
                raise ValueError(f"{path}: not a report of engine.evaluate --anomaly (missing"
                                 f" or malformed {e}); pass the --out files of that command"
                                 ) from e
        summary = summarize(reports)
        table = markdown_table(summary)
        if args.json:  # atomic: a full disk never leaves half a summary over the old one
            atomic_write_bytes(Path(args.json), (json.dumps(summary, indent=2) + "\n").encode())
        if args.markdown:
            atomic_write_bytes(Path(args.markdown), table.encode())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unreadable report, or a read-only or full output folder
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
