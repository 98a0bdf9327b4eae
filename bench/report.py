#!/usr/bin/env python3
"""Writes BENCHMARKS.md from the raw results of bench/run (stdout).

Usage: bench/report.py RESULTS_DIR FD_LIMIT
The measured part is generated; bench/notes.md (the analysis: where the time
and memory go) is appended as written.
"""
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone

from histogram import quantile

results, fd_limit = sys.argv[1], sys.argv[2]


def load(name):
    path = os.path.join(results, name + ".json")
    with open(path) as f:
        return json.load(f)


def read(name, suffix):
    with open(os.path.join(results, name + suffix)) as f:
        return f.read().strip()


def engine_quantile(name, metric, q):
    """histogram_quantile over the engine's own buckets, in milliseconds."""
    return quantile(read(name, ".metrics"), metric, q)


def steady_engine(name, q):
    """The engine's own request→offer quantile ("p50", "p99") over the
    steady phase, as the simulator read it off /metrics as the phase began
    and ended; the whole run's (the ramp's connection storm in it) where the
    simulator did not."""
    steady = load(name).get("engine_request_to_offer_ms")
    if steady:
        return steady[q]
    return engine_quantile(name, "ridelock_request_to_offer_seconds", 0.5 if q == "p50" else 0.99)


def machine():
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    cores = os.cpu_count()
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    return f"{cores} cores ({cpu}), {mem_kib / 1024 / 1024:.0f} GiB RAM, Linux {platform.release()}, {rustc}, open-file limit {fd_limit} per process"


lb = load("loopback")
loc = load("locations")
mx = load("matches-max")
mxp = load("matches-max-pooled")
floods = [(kind, load("flood-" + kind), load("flood-" + kind + "-flood") if kind != "none" else None)
          for kind in ["none", "text", "binary", "ping"]]
l5 = load("latency-5k")
l1 = load("latency-1k")
city = load("city")

one_way = lb["one_way_msgs_per_s"]
echo = lb["echo_round_trips_per_s"]
rtt99 = lb["rtt_ms_p99"]


def pct(x, of):
    return f"{100 * x / of:.1f}%" if of else "n/a"


def ms(x):
    return "n/a" if x is None else f"{x:.3f}"


rows = []
loc_taken = loc.get("engine_location_updates_per_s") or 0
rows.append(("Connected drivers held by one engine", f"{loc['connected_drivers_peak']:,}", "100,000",
             "missed: capped by the open-file limit (see below)", "n/a"))
rss_per = loc.get("engine_rss_kib_per_driver")
rows.append(("Engine RSS per connected driver", f"{rss_per:.1f} KiB" if rss_per else "n/a", "≤ 16 KiB",
             "met" if rss_per and rss_per <= 16 else "missed", "n/a"))
rows.append(("Location updates/s taken by the engine", f"{loc_taken:,.0f}", "≥ 100,000",
             "met" if loc_taken >= 100_000 else "missed", f"{pct(loc_taken, one_way)} of {one_way:,.0f} one-way msgs/s"))
cpu = loc.get("engine_cpu_cores")
if cpu and loc_taken:
    per_update_us = cpu / loc_taken * 1e6
    rows.append(("Engine CPU per location update (same run)", f"{per_update_us:.1f} µs ({cpu:.2f} cores busy)",
                 "≤ 20 µs (derived: 100k/s on 2 cores)", "met" if per_update_us <= 20 else "missed",
                 f"projected {2e6 / per_update_us:,.0f} updates/s on 2 cores of its own"))
# Repeated scenarios: run 1 is NAME, later ones NAME-2, NAME-3, ...
runs = int(read("runs", "")) if os.path.exists(os.path.join(results, "runs")) else 1


def repeats(name):
    return [name] + [f"{name}-{i}" for i in range(2, runs + 1)]


def spread(values, fmt):
    """'worst … best' over the runs, and every run in order."""
    listed = ", ".join(fmt(v) for v in values)
    return f"{fmt(min(values))} – {fmt(max(values))} ({listed})" if len(values) > 1 else fmt(values[0])


pooled_runs = [load(n)["matches_per_s"] for n in repeats("matches-max-pooled")]
rows.append((f"Matches/s, instant accepts, demand 12k/s, 200 pooled rider connections, as the target's first measure was taken ({runs} runs)",
             spread(pooled_runs, lambda v: f"{v:,.0f}"), "≥ 10,000 in every run",
             "met" if min(pooled_runs) >= 10_000 else "missed",
             f"{pct(min(pooled_runs) * 4, echo)} of {echo:,.0f} echo round trips/s, worst run"))
mx_runs = [load(n)["matches_per_s"] for n in repeats("matches-max")]
rows.append((f"Matches/s, instant accepts, demand 12k/s, a connection and a token per rider ({runs} runs)",
             spread(mx_runs, lambda v: f"{v:,.0f}"), "≥ 10,000 in every run",
             "met" if min(mx_runs) >= 10_000 else "missed",
             f"{pct(min(mx_runs) * 4, echo)} of {echo:,.0f} echo round trips/s (a match is 4 in + 4 out), worst run"))
p99_runs = [load(n)["latency_ms"]["request_to_offer"]["p99"] for n in repeats("latency-5k")]
rows.append((f"p99 request→offer at 5k requests/s (clients' clock, {runs} runs)", spread(p99_runs, lambda v: f"{v:.3f} ms"),
             "< 2 ms", "met" if max(p99_runs) < 2 else "missed",
             f"{max(p99_runs) / rtt99:.1f}× the loopback RTT p99 ({rtt99:.3f} ms), worst run"))
e99_runs = [steady_engine(n, "p99") for n in repeats("latency-5k")]
e99_runs = [v for v in e99_runs if v is not None]
rows.append((f"p99 request→offer at 5k requests/s (engine's histogram over the steady phase, {runs} runs)",
             spread(e99_runs, lambda v: f"{v:.3f} ms") if e99_runs else "n/a", "< 2 ms in every run",
             "met" if e99_runs and max(e99_runs) < 2 else "missed", "in-process: no loopback hop"))


def scenario_rows(name, r):
    lat = r["latency_ms"]
    return (f"| {name} | {r['plan']['drivers']:,} | {r['requests_per_s']:,.0f} | {r['matches_per_s']:,.0f} | "
            f"{r['rejected']:,} | {r['no_driver_rate'] * 100:.2f}% | {lat['request_to_offer']['p50']:.3f} / "
            f"{lat['request_to_offer']['p99']:.3f} / {lat['request_to_offer']['max']:.1f} | "
            f"{lat['request_to_matched']['p50']:.3f} / {lat['request_to_matched']['p99']:.3f} | "
            f"{r['location_updates_per_s']:,.0f} | {r.get('engine_cpu_cores') or 0:.2f} cores | "
            f"{(r.get('engine_rss_kib_peak') or 0) / 1024:.0f} MiB | {r['violations']} |")


out = []
out.append("# Benchmarks\n")
measured_at = datetime.fromtimestamp(os.path.getmtime(os.path.join(results, "loopback.json")), timezone.utc)
out.append(f"Measured by `bench/run` on {measured_at.strftime('%Y-%m-%d %H:%M UTC')}. "
           "Engine and simulator share the machine's 2 cores: nothing is pinned, the simulator (about "
           "a core at 5k requests/s) runs at normal priority, and the engine's socket I/O threads run "
           "4 nice steps below its matcher thread (see the notes). Every figure is what the engine does "
           "with roughly half the machine. Absolute numbers drift on a shared machine; the loopback "
           "column relates each one to a plain tokio-tungstenite echo server measured in the same run. "
           f"The figures with targets under load (matches/s, both ways, and p99 request→offer) are measured in {runs} runs each and given as their "
           "spread (worst – best, then each run). Every section but \"Dispatch\" runs the engine "
           "with `--dispatch greedy` (the scripts set it), so that a request's first offer is "
           "measured, not a batch's window; \"Dispatch\" compares the dispatchers, and the "
           "default, batch with waiting.\n")
out.append(f"**Machine:** {machine()}.\n")
out.append("## Loopback limit (same run)\n")
out.append(f"`loopback serve` + `loopback bench`: {lb['connections']} connections, {lb['message_bytes']}-byte "
           "messages (a location update's size).\n")
out.append("| measure | value |\n| --- | --- |")
out.append(f"| one-way messages/s (client sends, server reads) | {one_way:,.0f} |")
out.append(f"| echo round trips/s (window of 16 per connection) | {echo:,.0f} |")
out.append(f"| round trip, one message at a time: p50 / p99 / max | {lb['rtt_ms_p50']:.3f} / {lb['rtt_ms_p99']:.3f} / {lb['rtt_ms_max']:.3f} ms |\n")
out.append("## Targets\n")
out.append("| figure | measured | target | verdict | against the loopback limit |\n| --- | --- | --- | --- | --- |")
for r in rows:
    out.append("| " + " | ".join(r) + " |")
out.append("")
out.append("## Scenarios\n")
out.append("Latencies in ms from the simulator's clock (request sent → offer received by the driver, "
           "→ `matched` received by the rider): p50 / p99 / max.\n")
out.append("| scenario | drivers | requests/s | matches/s | refused | no-driver | request→offer | request→matched | location updates/s | engine CPU | engine RSS | violations |")
out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for name in ["locations"] + repeats("matches-max") + repeats("matches-max-pooled") + repeats("latency-5k") + ["latency-1k", "city"]:
    out.append(scenario_rows(name, load(name)))
out.append("")
out.append("Riders connect as people do (`--riders person`): every request is a rider of its own who "
           "connects, sends a token, asks, waits for the final message and closes, so the engine runs "
           "with its production limits. `matches-max-pooled` sends the same demand over 200 long-lived "
           "rider connections (per-rider and per-connection limits lifted), as reports before tokens "
           "did; the difference is what a connection and a token check per rider cost. `refused` counts "
           "requests refused at the door (`overloaded`, `too_many_requests`); arrivals the simulator could "
           "not give a connection are not requests.\n")
out.append("## Floods\n")
out.append("A second simulator process opens 2,000 connections that flood the engine with one kind of "
           "frame, as fast as their sockets take them, reconnecting whenever the engine closes them; beside "
           "it, 2,000 drivers and riders at 200 requests/s, whose request→offer latency (their simulator's "
           "clock, ms) is the measure. Every frame counts against a connection's 50/s allowance (bursts of "
           "100); past it the engine stops reading that connection until the next frame's turn, so TCP holds "
           "the flood in the flooder's buffers, and a connection that keeps frames waiting for ten seconds "
           "is closed with 1008.\n")
out.append("| flood | frames/s the flood wrote to its sockets | flood connections closed by the engine | riders' request→offer p50 / p99 / max | engine CPU | violations |")
out.append("| --- | --- | --- | --- | --- | --- |")
for kind, r, f in floods:
    lat = r["latency_ms"]["request_to_offer"]
    sent = f"{f['flood_frames_per_s']:,.0f}" if f else "0"
    closed = f"{f['flood_closes']:,}" if f else "0"
    out.append(f"| {kind} | {sent} | {closed} | "
               f"{lat['p50']:.3f} / {lat['p99']:.3f} / {lat['max']:.1f} | {r.get('engine_cpu_cores') or 0:.2f} cores | "
               f"{r['violations']} |")
out.append("")
out.append("Engine-side request→offer (its own `ridelock_request_to_offer_seconds` histogram, "
           "interpolated within buckets), p50 / p99, over the steady phase (the simulator scrapes "
           "`/metrics` as it begins and ends) and over the whole run (ramp and drain in it):\n")
for name in repeats("matches-max") + repeats("matches-max-pooled") + repeats("latency-5k") + ["latency-1k", "city"]:
    p50 = engine_quantile(name, "ridelock_request_to_offer_seconds", 0.5)
    p99 = engine_quantile(name, "ridelock_request_to_offer_seconds", 0.99)
    out.append(f"- {name}: steady {ms(steady_engine(name, 'p50'))} / {ms(steady_engine(name, 'p99'))} ms; "
               f"whole run {ms(p50)} / {ms(p99)} ms")
out.append("")
# The cluster, dispatch, groups, ops, scale and observer sections are
# other scripts', with paragraphs written by hand between them: everything
# from the first of them to the command lines is carried over as it is.
previous = os.path.join(os.path.dirname(__file__), "..", "BENCHMARKS.md")
text = open(previous).read() if os.path.exists(previous) else ""
first, last = "<!-- cluster: written by bench/cluster -->", "## Command lines"
if first in text and last in text and text.index(first) < text.index(last):
    out.append(text[text.index(first):text.index(last)].rstrip() + "\n")
else:
    for section in ("cluster", "dispatch", "groups", "ops", "scale"):
        begin, end = f"<!-- {section}: written by bench/{section} -->", f"<!-- /{section} -->"
        if begin in text and end in text:
            out.append(text[text.index(begin):text.index(end) + len(end)] + "\n")
out.append("## Command lines\n")
out.append("```sh")
out.append("target/release/loopback serve --listen 127.0.0.1:19000")
out.append("target/release/loopback bench --url ws://127.0.0.1:19000 --duration 10s")
for name in ["locations", "matches-max", "matches-max-pooled", "latency-5k", "latency-1k", "city",
             "flood-none", "flood-text", "flood-binary", "flood-ping"]:
    out.append(f"target/release/ridelock --listen 127.0.0.1:19100 --auth-secret-file SECRET --max-connections {int(fd_limit) - 200} {read(name, '.engine-flags')}".rstrip())
    if os.path.exists(os.path.join(results, name + ".flood-flags")) and read(name, ".flood-flags"):
        out.append(f"target/release/simulator --url ws://127.0.0.1:19100 --auth-secret-file SECRET {read(name, '.flood-flags')} &")
    out.append(f"target/release/simulator --url ws://127.0.0.1:19100 --engine-pid PID --auth-secret-file SECRET {read(name, '.sim-flags')}")
out.append("```\n")
with open(os.path.join(os.path.dirname(__file__), "notes.md")) as f:
    out.append(f.read())
print("\n".join(out))
