#!/usr/bin/env python3
"""Groups a cachegrind count per request by where each function lives (the groups of
profile_groups.py): the instructions-per-request table beside count.sh's figures.

    examples/bench/count_groups.py target/bench-count/diff.sluice-full.h1 10000 [top]

The first argument is `cg_diff`'s output (or any cachegrind out file), the second the
number of requests it covers; with a third, the `top` functions are listed as well.
"""

import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_groups import GROUPS  # noqa: E402


def per_function(path):
    """Instructions (Ir) per (file, function) in a cachegrind out file."""
    counts = defaultdict(int)
    fl = fn = None
    # Ir is the first event column; only counts lines (a line number then numbers).
    with open(path) as f:
        for line in f:
            if line.startswith("fl="):
                fl = line[3:].strip()
            elif line.startswith("fn="):
                fn = line[3:].strip()
            elif line[:1].isdigit() or line[:1] == "-":
                parts = line.split()
                if len(parts) >= 2 and fn is not None:
                    counts[(fl, fn)] += int(parts[1])
    return counts


def group_of(fl, fn):
    # Shared objects other than the binary show as their library's path.
    dso = "libc.so" if fl and ("glibc" in fl or "/libc" in fl or fl.startswith("./")) else (fl or "")
    if fn.startswith(("__memmove", "memmove", "__memcpy", "memcpy", "__memset", "memset")):
        dso = "libc.so"
    return next((g for g, test in GROUPS if test(dso, fn)), "the rest")


def main():
    path, requests = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    counts = per_function(path)
    groups = defaultdict(int)
    for (fl, fn), ir in counts.items():
        groups[group_of(fl, fn)] += ir
    total = sum(groups.values())
    print(f"| where | instructions per request | share |")
    print("|---|---|---|")
    for g, ir in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {ir / requests:,.0f} | {ir / total * 100:.1f} % |")
    print(f"| **total** | **{total / requests:,.0f}** | |")
    if top:
        print()
        for (fl, fn), ir in sorted(counts.items(), key=lambda kv: -kv[1])[:top]:
            print(f"{ir / requests:8,.0f}  {re.sub(r'::h[0-9a-f]{16}$', '', fn)[:140]}")


if __name__ == "__main__":
    main()
