#!/usr/bin/env python3
"""The "Groups" section of BENCHMARKS.md from bench/groups' results.

Usage: bench/groups_report.py RESULTS_DIR (writes Markdown to stdout)."""
import json
import os
import re
import sys
from datetime import datetime, timezone

from histogram import quantile

results = sys.argv[1]
RUNS = [("groups-0-60", "none", 60), ("groups-10-60", "1 in 10", 60),
        ("groups-30-60", "3 in 10", 60), ("groups-30-90", "3 in 10", 90),
        ("groups-cluster-30-60", "3 in 10, 2 nodes", 60),
        ("groups-cluster-30-90", "3 in 10, 2 nodes", 90)]


def load(name):
    with open(os.path.join(results, name + ".json")) as f:
        return json.load(f)


def metrics(name):
    path = os.path.join(results, name + ".metrics")
    return open(path).read() if os.path.exists(path) else ""


def counter(text, metric, labels=None):
    """The sum of `metric`'s series (those whose labels contain `labels`)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"%s(\{[^}]*\})? (\S+)$" % re.escape(metric), line)
        if m and (labels is None or labels in (m.group(1) or "")):
            total += float(m.group(2))
    return total


def fmt(x, spec=".0f"):
    return "n/a" if x is None else format(x, spec)


def pct(x):
    return "n/a" if x is None else f"{x * 100:.1f}%"


def lat(p):
    return "n/a" if not p["count"] else f"{p['p50']:.0f} / {p['p99']:.0f}"


lb = load("loopback")
now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
out = ["## Groups: several vehicles, all or none\n"]
out.append(f"Written by `bench/groups` on {now}. Loopback limit in the same run: "
           f"{lb['one_way_msgs_per_s']:,.0f} one-way messages/s, "
           f"{lb['echo_round_trips_per_s']:,.0f} echo round trips/s. The loads are light: "
           "what is measured is how often and how fast groups complete beside single "
           "requests, and what they cost the single ones.\n")
out.append("The same seeded city (1,000 drivers in a 3 km radius, trips of 10 s, one offer "
           "in ten declined, offers of 5 s, searches of 20 s). A group asks for 2 to 4 vehicles "
           "(uniformly). The request rates are set so that the vehicles asked for keep about 60% "
           "of drivers busy (the last run about 90%). Group request→matched is the simulator's "
           "clock from the request to its one `matched`; group completion is the engine's "
           "`ridelock_group_completion_seconds`; taken is `ridelock_preemptions_total` (a "
           "driver an older group took from a younger one).\n")
out.append("| run | groups | requests (groups) | matched single / group | single match rate | "
           "group match rate | single request→matched p50 / p99 ms | group request→matched p50 / p99 ms | "
           "engine group completion p50 / p99 ms | groups failed: incomplete / cancelled | taken | engine CPU |")
out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
rows = {}
for name, mix, util in RUNS:
    if not os.path.exists(os.path.join(results, name + ".json")):
        continue
    r = load(name)
    m = metrics(name)
    g = r["groups"]
    singles_matched = r["matches"] - g["matched"]
    single_requests = r["acknowledged"] - g["requests"]
    failed_incomplete = counter(m, "ridelock_groups_failed_total", 'reason="group_incomplete"')
    failed_cancelled = counter(m, "ridelock_groups_failed_total", 'reason="rider_cancelled"')
    taken = counter(m, "ridelock_preemptions_total")
    latency = r["latency_ms"]
    single_rate = singles_matched / single_requests if single_requests else None
    group_rate = g["matched"] / g["requests"] if g["requests"] else None
    rows[name] = (single_rate, latency["request_to_matched"]["p50"], group_rate,
                  failed_incomplete, failed_cancelled, taken)
    out.append(
        f"| ~{util}% busy | {mix} | {r['acknowledged']} ({g['requests']}) | "
        f"{singles_matched} / {g['matched']} | {pct(single_rate)} | {pct(group_rate)} | "
        f"{lat(latency['request_to_matched'])} | {lat(latency['group_request_to_matched'])} | "
        f"{fmt(quantile(m, 'ridelock_group_completion_seconds', 0.5))} / "
        f"{fmt(quantile(m, 'ridelock_group_completion_seconds', 0.99))} | "
        f"{failed_incomplete:.0f} / {failed_cancelled:.0f} | {taken:.0f} | "
        f"{fmt(r.get('engine_cpu_cores'), '.2f')} cores |")
out.append("")
if "groups-0-60" in rows and "groups-30-60" in rows:
    base, mixed = rows["groups-0-60"], rows["groups-30-60"]
    out.append(f"- Single requests beside three groups in ten, at the same utilisation: match rate "
               f"{pct(mixed[0])} against {pct(base[0])} with no groups, request→matched p50 "
               f"{mixed[1]:.0f} ms against {base[1]:.0f} ms.")
if "groups-30-90" in rows:
    _, _, rate, incomplete, cancelled, taken = rows["groups-30-90"]
    out.append(f"- At ~90% busy, {pct(rate)} of groups complete ({incomplete:.0f} failed incomplete, "
               f"{cancelled:.0f} cancelled by their riders, the drain's included), and older groups took "
               f"{taken:.0f} drivers from younger ones. A group holds the drivers that accepted while it "
               "looks for the rest, so it costs more driver time than its trips.")
for single, cluster in (("groups-30-60", "groups-cluster-30-60"), ("groups-30-90", "groups-cluster-30-90")):
    if single in rows and cluster in rows:
        util = "60" if single.endswith("60") else "90"
        out.append(f"- Two cluster nodes, ~{util}% busy, groups spanning nodes: group match rate "
                   f"{pct(rows[cluster][2])} against {pct(rows[single][2])} on one node; "
                   f"{rows[cluster][3]:.0f} failed incomplete against {rows[single][3]:.0f}; "
                   f"{rows[cluster][5]:.0f} drivers taken by older groups (on one node "
                   f"{rows[single][5]:.0f}).")
out.append("- Every run: 0 violations from the simulator's live checker, which checks that "
           "every `matched` names as many distinct drivers as asked for, each of whom "
           "accepted, and that no driver is offered anything while held.\n" if all(
               load(n)["violations"] == 0 for n, _, _ in RUNS
               if os.path.exists(os.path.join(results, n + ".json")))
           else "- **Violations were found**: see the raw reports.\n")
out.append("```sh")
for name, _, _ in RUNS:
    if os.path.exists(os.path.join(results, name + ".sim-flags")):
        engine = open(os.path.join(results, name + ".engine-flags")).read().strip()
        sim = open(os.path.join(results, name + ".sim-flags")).read().strip()
        if name.startswith("groups-cluster"):
            engine = engine.replace(" (2 nodes, one redis-server)", "")
            out.append("redis-server --port 19300 --save '' --appendonly no")
            for i in (0, 1):
                out.append(f"target/release/ridelock --listen 127.0.0.1:{19100 + i} "
                           f"--redis redis://127.0.0.1:19300 --node-id n{i} "
                           f"--auth-secret-file SECRET {engine}")
            out.append("target/release/simulator --url ws://127.0.0.1:19100,ws://127.0.0.1:19101 "
                       f"--engine-pid PID0,PID1 --auth-secret-file SECRET {sim}")
            continue
        out.append(f"target/release/ridelock --listen 127.0.0.1:19100 --auth-secret-file SECRET {engine}")
        out.append(f"target/release/simulator --url ws://127.0.0.1:19100 --engine-pid PID --auth-secret-file SECRET {sim}")
out.append("```")
print("\n".join(out))
