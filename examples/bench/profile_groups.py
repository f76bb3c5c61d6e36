#!/usr/bin/env python3
"""Groups a flat perf profile of the proxy (perf report --sort dso,symbol, self time) by
where each symbol lives: the kernel, Sluice's own code, hyper, tokio, the allocator, the
clock... the rows of BENCHMARKS.md's "where the microseconds go".

    perf report -i perf.data --stdio --no-children --sort dso,symbol -g none \\
        --percent-limit 0 | examples/bench/profile_groups.py [CPU µs per request]
"""

import re
import sys
from collections import defaultdict

# First match wins: (group, test on dso and symbol).
GROUPS = [
    ("kernel", lambda d, s: d.startswith("[kernel")),
    ("clock (clock_gettime, vDSO)", lambda d, s: d == "[vdso]" or "clock_gettime" in s),
    ("libc (memmove, writev, recv...)", lambda d, s: d.startswith("libc")),
    ("allocator (mimalloc)", lambda d, s: s.startswith(("mi_", "_mi_", "mi_theap")) or "mimalloc" in s),
    ("Sluice's own code (sluice_*)", lambda d, s: re.search(r"\bsluice_\w+::", s) is not None
        and not re.match(r"<?(hyper|tokio|tower|futures|http|bytes)", s)),
    ("hyper-util", lambda d, s: "hyper_util::" in s),
    ("hyper (HTTP/1 and HTTP/2 codec, dispatch)", lambda d, s: "hyper::" in s or "httparse" in s or s.startswith("h2::") or "<h2::" in s),
    ("tokio", lambda d, s: "tokio::" in s or "mio::" in s),
    ("http (header maps, URIs, extensions)", lambda d, s: re.search(r"\bhttp::", s) is not None),
    ("bytes", lambda d, s: "bytes::" in s),
    ("tower, futures, core/alloc glue", lambda d, s: any(k in s for k in ("tower", "futures", "core::", "alloc::", "std::"))),
]


def main():
    per_req = float(sys.argv[1]) if len(sys.argv) > 1 else None
    shares = defaultdict(float)
    top = defaultdict(list)
    for line in sys.stdin:
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*?)\s*(?:-\s+-\s*)?$", line)
        if not m:
            continue
        pct, dso, sym = float(m.group(1)), m.group(2), m.group(3)
        group = next((g for g, test in GROUPS if test(dso, sym)), "the rest")
        shares[group] += pct
        top[group].append((pct, sym))
    total = sum(shares.values())
    print("| where | share | µs per request |" if per_req else "| where | share |")
    print("|---|---|---|" if per_req else "|---|---|")
    for g, v in sorted(shares.items(), key=lambda kv: -kv[1]):
        share = v / total * 100
        cells = [g, f"{share:.1f} %"]
        if per_req:
            cells.append(f"{share / 100 * per_req:.1f}")
        print("| " + " | ".join(cells) + " |")
    print()
    for g, syms in top.items():
        syms.sort(reverse=True)
        print(f"{g}: " + "; ".join(f"{s[:70]} {p:.1f}%" for p, s in syms[:4]))


if __name__ == "__main__":
    main()
