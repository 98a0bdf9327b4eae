#!/usr/bin/env python3
"""Writes "What a node pays for other nodes' drivers" in BENCHMARKS.md from
two runs of `SCALE_OBSERVER=1 bench/scale`: one with the engine before
batched announcements, one after (each point's observer is a cluster node
no client connects to, so all it spends is on the other nodes' drivers).

    python3 bench/observer_report.py BEFORE_RESULTS AFTER_RESULTS
"""
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
before_dir, after_dir = sys.argv[1], sys.argv[2]


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


before, after = rows(before_dir), rows(after_dir)
loopback = load(after_dir, "loopback.json")
text = ["### What a node pays for other nodes' drivers\n"]
text.append(
    f"Written by `bench/observer_report.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
    "from two runs of `SCALE_OBSERVER=1 bench/scale`: the engine just before batched announcements "
    "(`SCALE_ENGINE` pointing at a build of commit 52389d4) and this tree's, with the same simulator, "
    "seed and load as the Scale table. Each point adds an *observer*: one more node of the cluster "
    "that no client connects to. It reads every announcement and keeps every available driver in its "
    "index like any node, and serves nobody, so its CPU is what one node pays for the other nodes' "
    "drivers, apart from what it pays for its own clients (which the node CPU column above mixes in). "
    f"Loopback limit in the after run: {loopback['one_way_msgs_per_s']:,.0f} one-way messages/s.\n")
text.append("| drivers | serving nodes | engine | observer CPU (cores) | observer messages read/s | "
            "observer announcements read/s | observer RSS | serving node CPU (mean) | matches/s | "
            "pickup p50 | violations |")
text.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for key in sorted(set(before) | set(after)):
    for label, table in (("before", before), ("after", after)):
        if key not in table:
            continue
        m, r = table[key]
        text.append(
            f"| {key[0]:,} | {key[1]} | {label} | {m['observer_cpu_cores']:.3f} | "
            f"{m['observer_messages_per_s']:,.0f} | {m['observer_announcements_per_s']:,.0f} | "
            f"{m['observer_rss_kib'] / 1024:.0f} MiB | {mean(m['node_cpu_cores']):.2f} | "
            f"{r['matches_per_s']:.0f} | {r['pickup_distance_m']['p50']:.0f} m | {r['violations']} |")
text.append("")
for key in sorted(set(before) & set(after)):
    (m0, r0), (m1, r1) = before[key], after[key]
    c0, c1 = m0["observer_cpu_cores"], m1["observer_cpu_cores"]
    text.append(
        f"- {key[0]:,} drivers over {key[1]} serving nodes: the observer's CPU {c0:.3f} → {c1:.3f} "
        f"cores ({(c1 - c0) / c0 * 100:+.0f}%) for {m0['observer_announcements_per_s']:,.0f} → "
        f"{m1['observer_announcements_per_s']:,.0f} announcements/s read; "
        f"{c0 / max(m0['observer_announcements_per_s'], 1) * 1e6:.1f} → "
        f"{c1 / max(m1['observer_announcements_per_s'], 1) * 1e6:.1f} µs of CPU per announcement; "
        f"matches/s {r0['matches_per_s']:.0f} → {r1['matches_per_s']:.0f}, violations "
        f"{r0['violations']} → {r1['violations']}.")
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
