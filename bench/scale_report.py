#!/usr/bin/env python3
"""Writes the "Scale" section of BENCHMARKS.md from bench/scale's results:
the run in RESULTS, and (if it exists) the same grid measured before
batching the announcements, in bench/results-scale-before.

    python3 bench/scale_report.py RESULTS
"""
import json
import os
import re
import sys
import time

results = sys.argv[1]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = os.path.join(ROOT, "bench", "results-scale-before")


def load(folder, name):
    path = os.path.join(folder, name)
    return json.load(open(path)) if os.path.exists(path) else None


def mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


def rows(folder):
    names = load(folder, "runs.json") or []
    out = {}
    for name in names:
        measured = load(folder, name + ".measured.json")
        report = load(folder, name + ".json")
        if measured and report:
            out[(measured["drivers"], measured["nodes"])] = (measured, report)
    return out


now = rows(results)
before = rows(BEFORE) if os.path.isdir(BEFORE) else {}
loopback = load(results, "loopback.json")
text = ["## Scale: up to 100,000 drivers on one machine\n"]
text.append(f"Written by `bench/scale` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
            f"Loopback limit in the same run: {loopback['one_way_msgs_per_s']:,.0f} one-way messages/s, "
            f"{loopback['echo_round_trips_per_s']:,.0f} echo round trips/s. One Redis, N cluster nodes "
            "(each at most ~19,500 connections: one process's open-file budget), and the simulator's "
            "worker processes (`--workers`, by default one per 18,000 drivers), all on this 2-core "
            "machine. Drivers send a location every 4 s and move at street speed; 200 requests/s; "
            "trips of 20 s. CPU and reads are over the middle 20 s of the 30 s steady phase."
            + (" Rows marked *(before)* are the same grid run with an older engine (`SCALE_ENGINE`: "
               + ", ".join(sorted({os.path.basename(m.get("engine", "?")) for m, _ in before.values()}))
               + "; results in bench/results-scale-before)." if before else "") + "\n")
text.append("| drivers | nodes | node CPU (mean, cores) | node RSS (mean) | Redis CPU | Redis commands/s | PUBLISH/s | "
            "messages read per node/s | announcements read per node/s | request→offer p50 / p99 ms | "
            "request→matched p50 / p99 ms | violations |")
text.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def line(key, measured, report, label=""):
    d, n = key
    l1 = report["latency_ms"]["request_to_offer"]
    l2 = report["latency_ms"]["request_to_matched"]
    return (f"| {d:,}{label} | {n} | {mean(measured['node_cpu_cores']):.2f} | "
            f"{mean(measured['node_rss_kib']) / 1024:.0f} MiB | {measured['redis_cpu_cores']:.2f} | "
            f"{measured['redis_commands_per_s']:,.0f} | {measured['redis_publishes_per_s']:,.0f} | "
            f"{mean(measured['messages_read_per_node_per_s']):,.0f} | "
            f"{mean(measured['announcements_read_per_node_per_s']):,.0f} | "
            f"{l1['p50']:.2f} / {l1['p99']:.2f} | {l2['p50']:.0f} / {l2['p99']:.0f} | "
            f"{report['violations']} |")


for key in sorted(now):
    if key in before:
        text.append(line(key, *before[key], label=" (before)"))
    text.append(line(key, *now[key]))
text.append("")
for key in sorted(now):
    if key not in before:
        continue
    (m0, r0), (m1, r1) = before[key], now[key]
    c0, c1 = mean(m0["node_cpu_cores"]), mean(m1["node_cpu_cores"])
    text.append(f"- {key[0]:,} drivers on {key[1]} nodes: node CPU {c0:.2f} → {c1:.2f} cores "
                f"({(c1 - c0) / c0 * 100:+.0f}%), Redis CPU {m0['redis_cpu_cores']:.2f} → "
                f"{m1['redis_cpu_cores']:.2f}, messages read per node "
                f"{mean(m0['messages_read_per_node_per_s']):,.0f}/s → "
                f"{mean(m1['messages_read_per_node_per_s']):,.0f}/s; matches/s "
                f"{r0['matches_per_s']:.0f} → {r1['matches_per_s']:.0f}, pickup distance p50 "
                f"{r0['pickup_distance_m']['p50']:.0f} → {r1['pickup_distance_m']['p50']:.0f} m.")
print("\n".join(text))
section = "\n".join(text).strip()
path = os.path.join(ROOT, "BENCHMARKS.md")
doc = open(path).read()
begin, end = "<!-- scale: written by bench/scale -->", "<!-- /scale -->"
block = f"{begin}\n{section}\n{end}"
if begin in doc:
    doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
else:
    doc = doc.replace("## Command lines", block + "\n\n## Command lines", 1)
open(path, "w").write(doc)
