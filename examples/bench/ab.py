#!/usr/bin/env python3
"""Paired A/B from one run.sh run with BASELINE_BIN: for each protocol and measurement,
the per-round ratio of the build under test to the baseline (sluice-full ÷
sluice-full-base, sluice ÷ sluice-base), their median, and in how many rounds the build
under test did better. Rounds alternate the two builds, so they share the machine's noise.

    examples/bench/ab.py target/bench-quick/raw.csv
"""

import csv
import statistics
import sys
from collections import defaultdict

PAIRS = [("sluice-full", "sluice-full-base"), ("sluice", "sluice-base")]


def main():
    rows = list(csv.DictReader(open(sys.argv[1])))
    at = {(r["round"], r["proto"], r["test"], r["system"]): r for r in rows}
    keys = sorted({(r["proto"], r["test"]) for r in rows})
    print("| path | protocol | test | max req/s (new ÷ base) | better in | CPU per request (new ÷ base) | lower in | user space (new ÷ base) | lower in |")
    print("|---|---|---|---|---|---|---|---|---|")
    for new, base in PAIRS:
        for proto, test in keys:
            rps, cpu, user = [], [], []
            for rnd in sorted({r["round"] for r in rows}, key=int):
                a, b = at.get((rnd, proto, test, new)), at.get((rnd, proto, test, base))
                if not a or not b:
                    continue
                if test == "max" and float(b["rps"]) > 0:
                    rps.append(float(a["rps"]) / float(b["rps"]))
                if a["cpu_s_per_10k"] and b["cpu_s_per_10k"] and float(b["cpu_s_per_10k"]) > 0:
                    cpu.append(float(a["cpu_s_per_10k"]) / float(b["cpu_s_per_10k"]))
                # Older raw files have no user-space column.
                ua, ub = a.get("user_s_per_10k"), b.get("user_s_per_10k")
                if ua and ub and float(ub) > 0:
                    user.append(float(ua) / float(ub))
            if not cpu:
                continue
            r = f"{statistics.median(rps):.3f}×" if rps else "–"
            rb = f"{sum(x > 1 for x in rps)} of {len(rps)}" if rps else "–"
            c = f"{statistics.median(cpu):.3f}×"
            cb = f"{sum(x < 1 for x in cpu)} of {len(cpu)}"
            u = f"{statistics.median(user):.3f}×" if user else "–"
            ub = f"{sum(x < 1 for x in user)} of {len(user)}" if user else "–"
            print(f"| {new} | {proto} | {test} | {r} | {rb} | {c} | {cb} | {u} | {ub} |")


if __name__ == "__main__":
    main()
