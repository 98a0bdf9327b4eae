#!/usr/bin/env python3
"""Writes "What a node pays for other nodes' drivers" in BENCHMARKS.md from
runs of `SCALE_OBSERVER=1 bench/scale` with different engines (older ones
through `SCALE_ENGINE`), the first being the baseline. Each point's observer
is a cluster node no client connects to, so all it spends is on the other
nodes' drivers.

    python3 bench/observer_report.py 'LABEL=RESULTS=WHAT IT IS' ...
"""
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
engines = [arg.split("=", 2) for arg in sys.argv[1:]]
if len(engines) < 2 or any(len(e) != 3 for e in engines):
    sys.exit(__doc__)


def load(folder, name):
    path = os.path.join(folder, name)
    return json.load(open(path)) if os.path.exists(path) else None


def rows(folder):
    out = {}
    for name in load(folder, "runs.json") or []:
        measured = load(folder, name + ".measured.json")
        report = load(folder, name + ".json")
        if measured and report and "observer_cpu_cores" in measured:
            out[(measured["drivers"], measured["nodes"])] = (measured, report)
    return out


def mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


tables = [(label, rows(folder)) for label, folder, _ in engines]
loopback = load(engines[-1][1], "loopback.json")
text = ["### What a node pays for other nodes' drivers\n"]
text.append(
    f"Written by `bench/observer_report.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
    f"from {len(engines)} runs of `SCALE_OBSERVER=1 bench/scale`, one after the other, each with "
    "another engine (`SCALE_ENGINE`) and the same simulator, seed and load as the Scale table: "
    + "; ".join(f"*{label}* is {what}" for label, _, what in engines)
    + ". Each point adds an *observer*: one more node of the cluster "
    "that no client connects to. It reads every announcement and keeps every available driver in its "
    "index like any node, and serves nobody, so its CPU is what one node pays for the other nodes' "
    "drivers, apart from what it pays for its own clients (which the node CPU column above mixes in). "
    f"Loopback limit in the last run: {loopback['one_way_msgs_per_s']:,.0f} one-way messages/s.\n")
text.append("| drivers | serving nodes | engine | observer CPU (cores) | observer messages read/s | "
            "observer announcements read/s | observer RSS | serving node CPU (mean) | matches/s | "
            "pickup mean / p50 | violations |")
text.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
keys = sorted(set().union(*(set(t) for _, t in tables)))
for key in keys:
    for label, table in tables:
        if key not in table:
            continue
        m, r = table[key]
        text.append(
            f"| {key[0]:,} | {key[1]} | {label} | {m['observer_cpu_cores']:.3f} | "
            f"{m['observer_messages_per_s']:,.0f} | {m['observer_announcements_per_s']:,.0f} | "
            f"{m['observer_rss_kib'] / 1024:.0f} MiB | {mean(m['node_cpu_cores']):.2f} | "
            f"{r['matches_per_s']:.0f} | {r['pickup_distance_m']['mean']:.0f} / "
            f"{r['pickup_distance_m']['p50']:.0f} m | {r['violations']} |")
text.append("")
base_label, base = tables[0]
for key in keys:
    if key not in base:
        continue
    m0, r0 = base[key]
    c0 = m0["observer_cpu_cores"]
    steps = []
    for label, table in tables[1:]:
        if key in table:
            m1, r1 = table[key]
            c1 = m1["observer_cpu_cores"]
            steps.append(
                f"{label} {c1:.3f} ({(c1 - c0) / c0 * 100:+.0f}%), "
                f"{m1['observer_announcements_per_s']:,.0f} announcements/s, "
                f"{c1 / max(m1['observer_announcements_per_s'], 1) * 1e6:.1f} µs each, "
                f"{r1['matches_per_s']:.0f} matches/s, {r1['violations']} violations")
    text.append(
        f"- {key[0]:,} drivers over {key[1]} serving nodes: the observer's CPU, {base_label} "
        f"{c0:.3f} cores ({m0['observer_announcements_per_s']:,.0f} announcements/s, "
        f"{c0 / max(m0['observer_announcements_per_s'], 1) * 1e6:.1f} µs each, "
        f"{r0['matches_per_s']:.0f} matches/s, {r0['violations']} violations); " + "; ".join(steps) + ".")
print("\n".join(text))
section = "\n".join(text).strip()
path = os.path.join(ROOT, "BENCHMARKS.md")
doc = open(path).read()
begin, end = "<!-- observer: written by bench/observer_report.py -->", "<!-- /observer -->"
block = f"{begin}\n{section}\n{end}"
if begin in doc:
    doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
else:
    doc = doc.replace("<!-- /scale -->", "<!-- /scale -->\n\n" + block, 1)
open(path, "w").write(doc)
