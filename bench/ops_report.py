#!/usr/bin/env python3
"""Writes the "Ops map" section of BENCHMARKS.md from bench/ops's results
(stdout)."""
import json
import os
import sys
import time

results = sys.argv[1]


def load(name):
    path = os.path.join(results, name)
    return json.load(open(path)) if os.path.exists(path) else None


def read(name):
    return open(os.path.join(results, name)).read().strip()


loopback = load("loopback.json")
runs = {name: load(f"{name}.json") for name in
        ["ops-none-1", "ops-one-1", "ops-none-2", "ops-one-2", "ops-page"]}
page = load("ops-page.page.json")

out = ["## Ops map: what watching costs\n"]
out.append(f"Written by `bench/ops` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
           f"Loopback limit in the same run: {loopback['one_way_msgs_per_s']:,.0f} one-way messages/s, "
           f"{loopback['echo_round_trips_per_s']:,.0f} echo round trips/s.\n")
first = runs["ops-none-1"]
plan = first["plan"]
out.append(f"The same seeded city each run: {plan['drivers']:,} drivers (one process's open-file "
           "budget, less room for the riders: the 20,000-driver mark needs two simulator processes) "
           "in a 10 km radius sending locations every 4 s, 150 requests/s, trips of 20 s. Runs "
           "alternate without and with one watcher (`--ops-watchers 1`, a client reading "
           "`/ws/ops` as the page does). Engine CPU is over the steady phase (40 s).\n")
out.append("| run | watchers | engine CPU | matches/s | request→offer p50 / p99 ms | feed bytes/s | largest snapshot | violations |")
out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
cpu = {0: [], 1: []}
for name in ["ops-none-1", "ops-one-1", "ops-none-2", "ops-one-2"]:
    r = runs[name]
    if r is None:
        continue
    watchers = r["plan"]["ops_watchers"]
    cpu[watchers].append(r["engine_cpu_cores"])
    feed = r.get("ops_feed")
    l = r["latency_ms"]["request_to_offer"]
    rate = f"{feed['bytes_per_s'] / 1e3:,.0f} kB/s" if feed else "n/a"
    snapshot = f"{feed['snapshot_bytes_max'] / 1e3:,.0f} kB" if feed else "n/a"
    out.append(f"| {name} | {watchers} | {r['engine_cpu_cores']:.3f} cores | {r['matches_per_s']:.0f} | "
               f"{l['p50']:.2f} / {l['p99']:.2f} | {rate} | {snapshot} | {r['violations']} |")
out.append("")
if cpu[0] and cpu[1]:
    without = sum(cpu[0]) / len(cpu[0])
    with_one = sum(cpu[1]) / len(cpu[1])
    spread = max(max(cpu[0]) - min(cpu[0]), max(cpu[1]) - min(cpu[1]))
    verdict = (f"no cost that stands out of the spread between runs of the same kind "
               f"({min(cpu[0]):.3f}–{max(cpu[0]):.3f} without, {min(cpu[1]):.3f}–{max(cpu[1]):.3f} with)"
               if abs(with_one - without) <= spread else
               f"a cost of {with_one - without:+.3f} cores ({(with_one - without) / without * 100:+.1f}%)")
    out.append(f"- Engine CPU: {without:.3f} cores without a watcher, {with_one:.3f} with one "
               f"(mean of {len(cpu[0])} runs each): {verdict}. The board's upkeep (each driver actor "
               "writing its dot when what the map shows changed, about one map insert per location "
               "update) runs in both columns and is not separated here.")
feeds = [runs[n]["ops_feed"] for n in ["ops-one-1", "ops-one-2"] if runs[n] and runs[n].get("ops_feed")]
if feeds:
    rate = sum(f["bytes_per_s"] for f in feeds) / len(feeds)
    per = rate / plan["drivers"]
    out.append(f"- The feed sends {rate / 1e3:,.0f} kB/s to a watcher ({per:.0f} bytes/s per driver: "
               "each driver's newest position once per location update, coalesced within a batch), "
               "in at most four batches a second whatever the load.")
if page:
    out.append(f"- The `/ops` page in headless Chromium on the same 2-core machine as the engine and "
               f"the simulator (so competing with both), showing {page['drivers_shown']:,} drivers: "
               f"{page['fps']:.0f} frames/s, frame gap p50 {page['frame_gap_ms_p50']:.0f} ms, "
               f"p99 {page['frame_gap_ms_p99']:.0f} ms; drawing the map takes "
               f"{page['draw_ms_p50']:.1f} ms (p50, max {page['draw_ms_max']:.1f}); applying a "
               f"batch {page['apply_ms_p50']:.1f} ms (max {page['apply_ms_max']:.1f}). "
               f"0 JavaScript errors." if not page["errors"] else
               f"- The page reported JavaScript errors: {page['errors']}")
    s = page.get("snapshot")
    if s:
        out.append(f"- A snapshot of {s['drivers']:,} drivers is {s['bytes'] / 1e3:,.0f} kB: it reached "
                   f"the page {s['received_ms']:.0f} ms after the connection was opened, and parsed in "
                   f"{s['parse_ms']:.0f} ms.")
    p = runs["ops-page"]
    if p:
        out.append(f"- The run with the page: engine CPU {p['engine_cpu_cores']:.3f} cores, "
                   f"{p['violations']} violations. Its screenshot is the README's (`docs/ops-map.png`).")
out.append("\n```sh")
out.append(f"target/release/ridelock --listen 127.0.0.1:19100 --auth-secret-file SECRET {read('ops-none-1.engine-flags')}")
for name in ["ops-none-1", "ops-one-1"]:
    out.append(f"target/release/simulator --url ws://127.0.0.1:19100 --engine-pid PID --auth-secret-file SECRET {read(name + '.sim-flags')}")
out.append("```")
print("\n".join(out))
