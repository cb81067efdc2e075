"""Summarise a pytest-benchmark JSON: per group, each provider's median and its speed-up over
the eager baseline measured in the same run.

    python benchmarks/report.py results.json [--markdown]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def provider_of(bench: dict) -> str:
    return bench.get("params", {}).get("provider") or bench["extra_info"].get("provider", "?")


def rows(data: dict) -> list[tuple[str, str, float, float | None, dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"]].append(bench)
    out = []
    for group, benches in sorted(groups.items()):
        base = next((b["stats"]["median"] for b in benches if provider_of(b) == "eager"), None)
        for b in benches:
            median = b["stats"]["median"]
            out.append((group, provider_of(b), median, base / median if base else None,
                        b["extra_info"]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("json")
    args = p.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    print("| group | provider | median (ms) | speed-up vs eager | images/s |")
    print("|---|---|---:|---:|---:|")
    for group, provider, median, ratio, extra in rows(data):
        ips = extra.get("images_per_s")
        speedup = "" if ratio is None else f"{ratio:.2f}x"
        rate = "" if ips is None else f"{ips:,.0f}"
        print(f"| {group} | {provider} | {median * 1e3:.3f} | {speedup} | {rate} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
