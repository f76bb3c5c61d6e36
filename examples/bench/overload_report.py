#!/usr/bin/env python3
"""Turns the measurements of examples/bench/overload.sh (raw.jsonl, one line per system,
round and phase) into summary.csv, summary.md (for BENCHMARKS.md, with the goals and a
verdict each) and overload.png: medians over rounds."""

import argparse
import csv
import json
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAMES = {"none": "Sluice, no limit", "sluice": "Sluice adaptive", "envoy": "Envoy adaptive_concurrency"}
LEVELS = ["critical", "default", "sheddable"]


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=1, unit=""):
    return "–" if v is None else f"{v:.{digits}f}{unit}"


def main():
    ap = argparse.ArgumentParser()
    for flag in ("raw", "out-dir", "capacity", "workers", "work-per-kib", "over", "timeout",
                 "started", "rounds", "duration", "uptime-before", "uptime-after",
                 "load-before", "load-after", "versions", "machine", "proxy-cpus",
                 "load-cpus", "command"):
        ap.add_argument("--" + flag, default="")
    a = ap.parse_args()
    capacity = float(a.capacity)
    rows = [json.loads(line) for line in open(a.raw) if line.strip()]
    systems = [s for s in NAMES if any(r["system"] == s for r in rows)]

    def runs(system, phase):
        return [r for r in rows if r["system"] == system and r["phase"] == phase]

    def share(o, key):
        return 100.0 * o[key] / o["sent"] if o["sent"] else None

    fig = {}
    for s in systems:
        calm, half, over = runs(s, "calm"), runs(s, "half"), runs(s, "over")
        f = {
            "unloaded_p50": med(r["total"]["p50_ms"] for r in calm),
            "half_refused": med(share(r["total"], "refused") for r in half),
            "half_refused_n": sum(r["total"]["refused"] for r in half),
            "half_p50": med(r["total"]["p50_ms"] for r in half),
            "goodput": med(r["total"]["ok"] / r["seconds"] for r in over),
            "over_p50": med(r["total"]["p50_ms"] for r in over),
            "over_p99": med(r["total"]["p99_ms"] for r in over),
            "over_timed_out": med(share(r["total"], "timed_out") for r in over),
            "over_refused": med(share(r["total"], "refused") for r in over),
            "over_failed": med(share(r["total"], "failed") for r in over),
            "app_per_s": med(r.get("app_per_s") for r in over),
            "limit": med(r.get("limit") for r in over),
        }
        for lvl in LEVELS:
            f["refused_" + lvl] = med(share(r["levels"][lvl], "refused") for r in over if lvl in r["levels"])
            f["lost_" + lvl] = med(
                100.0 * (r["levels"][lvl]["sent"] - r["levels"][lvl]["ok"]) / max(r["levels"][lvl]["sent"], 1)
                for r in over if lvl in r["levels"])
        f["goodput_pct"] = None if f["goodput"] is None else 100.0 * f["goodput"] / capacity
        f["p50_ratio"] = (None if f["over_p50"] is None or not f["unloaded_p50"]
                          else f["over_p50"] / f["unloaded_p50"])
        fig[s] = f

    with open(f"{a.out_dir}/summary.csv", "w", newline="") as out:
        keys = list(next(iter(fig.values())).keys()) if fig else []
        w = csv.writer(out)
        w.writerow(["system"] + keys)
        for s in systems:
            w.writerow([s] + ["" if fig[s][k] is None else f"{fig[s][k]:.3f}" for k in keys])

    over_rate = capacity * float(a.over)
    md = []
    md.append(f"### {a.started} UTC: `{a.command}`, {a.rounds} rounds, systems alternating\n")
    md.append(f"The log service: {a.workers} workers, {a.work_per_kib} of work per 1 KiB ingest, "
              f"capacity {capacity:.0f} ingests/s. Phases per system and round: calm "
              f"({0.1 * capacity:.0f}/s, the unloaded latency), half ({0.5 * capacity:.0f}/s, "
              f"{a.duration} s) and {a.over}× ({over_rate:.0f}/s, {a.duration} s); 20 % "
              f"`critical`, 50 % `default`, 30 % `sheddable`; answers later than {a.timeout} "
              f"after their request was due count as timed out, not as goodput.\n")
    md.append(f"Machine: {a.machine}, **shared with other builds while this ran (a busy 2-core "
              f"machine: read the figures as orders of magnitude, not as a lab result)**. "
              f"`uptime` before: `{a.uptime_before.strip()}`; after: `{a.uptime_after.strip()}`. "
              f"Proxies and apps on CPU {a.proxy_cpus}, the load on CPU {a.load_cpus}. "
              f"{a.versions}.\n")
    head = ["", *[NAMES[s] for s in systems]]
    md.append("| " + " | ".join(head) + " |")
    md.append("|" + "---|" * len(head))

    def row(label, key, digits=1, unit=""):
        md.append("| " + " | ".join([label] + [fmt(fig[s][key], digits, unit) for s in systems]) + " |")

    row("unloaded p50 (0.1×), ms", "unloaded_p50")
    row("refused at half load, %", "half_refused", 2)
    md.append("| " + " | ".join(["refused at half load, requests (all rounds)"]
                               + [str(fig[s]["half_refused_n"]) for s in systems]) + " |")
    row(f"goodput at {a.over}×, ingests/s", "goodput", 0)
    row(f"goodput at {a.over}×, % of capacity", "goodput_pct", 0)
    row(f"admitted p50 at {a.over}×, ms", "over_p50")
    row(f"admitted p50 at {a.over}× ÷ unloaded p50", "p50_ratio", 2, "×")
    row(f"admitted p99 at {a.over}×, ms", "over_p99")
    row(f"refused (503) at {a.over}×, % of sent", "over_refused")
    row(f"timed out at {a.over}×, % of sent", "over_timed_out")
    row(f"stream or connection errors at {a.over}×, % of sent", "over_failed")
    row(f"the app's own answers at {a.over}× (in time or not), per s", "app_per_s", 0)
    for lvl in LEVELS:
        row(f"`{lvl}` refused at {a.over}×, %", "refused_" + lvl, 2)
    row(f"`critical` not served (refused or timed out) at {a.over}×, %", "lost_critical", 2)
    row("limit at the end of the burst", "limit", 0)
    md.append("")

    goals = [
        ("0 refusals at half load", lambda f: f["half_refused_n"] == 0,
         lambda f: f"{f['half_refused_n']} refused"),
        ("admitted p50 within 2× the unloaded p50 at 3×",
         lambda f: f["p50_ratio"] is not None and f["p50_ratio"] <= 2.0,
         lambda f: fmt(f["p50_ratio"], 2, "×")),
        ("goodput ≥ 90 % of capacity at 3×",
         lambda f: f["goodput_pct"] is not None and f["goodput_pct"] >= 90.0,
         lambda f: fmt(f["goodput_pct"], 0, " %")),
        ("critical refusals ≤ 1 % (counting every critical request not served in time)",
         lambda f: f["lost_critical"] is not None and f["lost_critical"] <= 1.0,
         lambda f: fmt(f["lost_critical"], 2, " %")),
    ]
    md.append("Goals (medians over rounds):\n")
    md.append("| goal | " + " | ".join(NAMES[s] for s in systems) + " |")
    md.append("|---|" + "---|" * len(systems))
    for name, ok, show in goals:
        cells = [f"{'met' if ok(fig[s]) else '**missed**'} ({show(fig[s])})" for s in systems]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    md.append("")
    open(f"{a.out_dir}/summary.md", "w").write("\n".join(md) + "\n")

    # The plot: goodput, latency and refusals by priority at 3x, side by side.
    colors = {"none": "#999999", "sluice": "#1f77b4", "envoy": "#d62728"}
    fig_, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    labels = [NAMES[s].replace(" ", "\n", 1) for s in systems]
    ax = axes[0]
    vals = [fig[s]["goodput_pct"] or 0 for s in systems]
    ax.bar(labels, vals, color=[colors[s] for s in systems])
    ax.axhline(90, color="black", linestyle="--", linewidth=1)
    ax.set_title(f"goodput at {a.over}× capacity (goal ≥ 90 %)")
    ax.set_ylabel("% of capacity")
    ax = axes[1]
    x = range(len(systems))
    ax.bar([i - 0.2 for i in x], [fig[s]["over_p50"] or 0 for s in systems], 0.4, label="admitted p50",
           color=[colors[s] for s in systems])
    ax.bar([i + 0.2 for i in x], [fig[s]["over_p99"] or 0 for s in systems], 0.4, label="admitted p99",
           color=[colors[s] for s in systems], alpha=0.45)
    unloaded = med(fig[s]["unloaded_p50"] for s in systems)
    if unloaded:
        ax.axhline(2 * unloaded, color="black", linestyle="--", linewidth=1,
                   label="2× unloaded p50")
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels)
    ax.set_title(f"admitted latency at {a.over}× (ms, log scale)")
    ax.legend(fontsize=8)
    ax = axes[2]
    width = 0.8 / len(LEVELS)
    for j, lvl in enumerate(LEVELS):
        ax.bar([i - 0.4 + width * (j + 0.5) for i in x], [fig[s]["refused_" + lvl] or 0 for s in systems],
               width, label=lvl)
    ax.set_xticks(list(x), labels)
    ax.set_title(f"refused (503) at {a.over}× by priority (%)")
    ax.legend(fontsize=8)
    fig_.suptitle(f"{a.started} UTC, busy shared 2-core machine (load {a.load_before} before, "
                  f"{a.load_after} after); {a.rounds} rounds, medians", fontsize=9)
    fig_.tight_layout()
    fig_.savefig(f"{a.out_dir}/overload.png", dpi=100)


if __name__ == "__main__":
    main()
