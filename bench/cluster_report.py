#!/usr/bin/env python3
"""The "Cluster mode" section of BENCHMARKS.md from bench/cluster's results.

Usage: bench/cluster_report.py RESULTS_DIR (writes Markdown to stdout)."""
import json
import os
import sys
from datetime import datetime, timezone

from histogram import quantile

results = sys.argv[1]


def load(name):
    with open(os.path.join(results, name + ".json")) as f:
        return json.load(f)


def node_quantile(name, metric, q, labels=""):
    """histogram_quantile over node n0's buckets, in milliseconds."""
    path = os.path.join(results, name + ".metrics")
    if not os.path.exists(path):
        return None
    return quantile(open(path).read(), metric, q, labels)


def ms(x):
    return "n/a" if x is None else f"{x:.3f}"


lb = load("loopback")
rtt50, rtt99 = lb["rtt_ms_p50"], lb["rtt_ms_p99"]
measured = datetime.fromtimestamp(os.path.getmtime(os.path.join(results, "loopback.json")), timezone.utc)
out = ["## Cluster mode (Redis locks)\n"]
out.append(f"Measured by `bench/cluster` on {measured.strftime('%Y-%m-%d %H:%M UTC')}, a separate run from the "
           "tables above, with its own loopback limit: "
           f"{lb['one_way_msgs_per_s']:,.0f} one-way messages/s, {lb['echo_round_trips_per_s']:,.0f} echo round "
           f"trips/s, round trip p50 / p99 {rtt50:.3f} / {rtt99:.3f} ms. Compare those with the loopback figures "
           "above before comparing anything else: the machine's speed drifts.\n")
out.append("The same load (5,000 drivers answering at once, trips of 1 s, Poisson requests) against a standalone "
           "engine, one node taking every lock in a private `redis-server`, and two nodes sharing it (drivers and "
           "riders alternate between the nodes, so about half the matches cross nodes). Nodes, Redis and the "
           "simulator share the machine's two cores. Latencies from the simulator's clock, ms.\n")
out.append("| run | requests/s | matches/s | request→offer p50 / p99 | vs. loopback RTT p50 / p99 | request→matched p50 / p99 | engine CPU (all nodes) | Redis CPU | violations |")
out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for rate in (1000, 3000):
    for kind in ("standalone", "cluster-1-node", "cluster-2-nodes"):
        name = f"{kind}-{rate}"
        try:
            r = load(name)
        except FileNotFoundError:
            continue
        o, mt = r["latency_ms"]["request_to_offer"], r["latency_ms"]["request_to_matched"]
        redis = "–"
        cpu_path = os.path.join(results, name + ".redis-cpu")
        if os.path.exists(cpu_path) and r["elapsed_s"]:
            redis = f"{float(open(cpu_path).read()) / r['elapsed_s']:.2f} cores"
        out.append(f"| {name} | {r['requests_per_s']:,.0f} | {r['matches_per_s']:,.0f} | {o['p50']:.3f} / {o['p99']:.3f} | "
                   f"{o['p50'] / rtt50:.0f}× / {o['p99'] / rtt99:.0f}× | {mt['p50']:.3f} / {mt['p99']:.3f} | "
                   f"{r.get('engine_cpu_cores') or 0:.2f} cores | {redis} | {r['violations']} |")
out.append("")
out.append("Node n0's own histograms, p50 / p99 in ms (Redis CPU is its average over the whole run, ramp and drain included):\n")
for rate in (1000, 3000):
    for kind in ("cluster-1-node", "cluster-2-nodes"):
        name = f"{kind}-{rate}"
        parts = [f"request→offer {ms(node_quantile(name, 'ridelock_request_to_offer_seconds', 0.5))} / "
                 f"{ms(node_quantile(name, 'ridelock_request_to_offer_seconds', 0.99))}"]
        for op in ("acquire", "confirm", "finish"):
            label = f'op="{op}",'
            parts.append(f"Redis {op} {ms(node_quantile(name, 'ridelock_redis_op_seconds', 0.5, label))} / "
                         f"{ms(node_quantile(name, 'ridelock_redis_op_seconds', 0.99, label))}")
        out.append(f"- {name}: " + "; ".join(parts))
out.append("")
notes = os.path.join(os.path.dirname(__file__), "cluster-notes.md")
if os.path.exists(notes):
    out.append(open(notes).read().strip())
print("\n".join(out))
