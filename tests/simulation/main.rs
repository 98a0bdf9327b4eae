//! The fault simulation: the booking core of several nodes, a lossy network
//! between them, lock servers that fail, and apps that do anything the
//! protocol allows, all in virtual time from one seed. Invariants are
//! checked after every event and once everything has settled.
//!
//! `RIDELOCK_SIM_SEED=<n>` replays one seed and prints its trace;
//! `RIDELOCK_SIM_EVENTS=<n>` sets how many events a run covers at least;
//! `RIDELOCK_SIM_FIRST_SEED=<n>` starts there instead of at seed 0.

mod apps;
mod check;
#[path = "../common/mod.rs"]
mod common;
mod model_check;
mod redis;
mod world;
mod wound_wait;

use std::io::Write;
use std::time::Duration;

use world::{Shape, World};

/// The kinds of city a seed runs, by `seed % 4`.
fn shape(seed: u64) -> Shape {
    let (nodes, servers) = match seed % 4 {
        0 => (1, 0),
        1 => (2, 1),
        _ => (3, 3),
    };
    Shape {
        nodes,
        servers,
        drivers: 24,
        riders: 24,
        active: Duration::from_secs(40),
        quiet: Duration::from_secs(150),
        faults: true,
    }
}

/// Runs one seed; the violation found, if any.
fn run(seed: u64, tracing: bool) -> (World, Result<(), String>) {
    let shape = shape(seed);
    let mut world = World::new(seed, shape.clone(), tracing);
    world.schedule_fault();
    let result = (|| {
        world.run_until(world.base + shape.active)?;
        world.wind_down();
        world.run_until(world.base + shape.active + shape.quiet)?;
        let ledger = std::mem::take(&mut world.ledger);
        let settled = ledger.settled(&world);
        world.ledger = ledger;
        settled
    })();
    (world, result)
}

#[test]
fn fault_simulation() {
    let replay: Option<u64> = std::env::var("RIDELOCK_SIM_SEED")
        .ok()
        .map(|s| s.parse().expect("a seed"));
    let min_events: u64 = std::env::var("RIDELOCK_SIM_EVENTS")
        .ok()
        .map(|s| s.parse().expect("a number"))
        .unwrap_or(3_000_000);
    let (mut events, mut seeds, mut faults) = (0u64, 0u64, 0u64);
    let (mut groups_matched, mut groups_failed, mut preemptions) = (0u64, 0u64, 0u64);
    // `RIDELOCK_SIM_FIRST_SEED` starts a long run past the seeds every
    // `cargo test` covers.
    let first: u64 = std::env::var("RIDELOCK_SIM_FIRST_SEED")
        .ok()
        .map(|s| s.parse().expect("a seed"))
        .unwrap_or(0);
    let mut seed = replay.unwrap_or(first);
    loop {
        let (world, result) = run(seed, replay.is_some());
        events += world.events_run;
        faults += world.faults_injected;
        groups_matched += world.ledger.groups_matched;
        groups_failed += world.ledger.groups_failed;
        preemptions += world.preemptions;
        seeds += 1;
        if let Err(violation) = result {
            // Run it again with the trace on, to show how it came about.
            let (world, _) = run(seed, true);
            let path = std::env::temp_dir().join(format!("ridelock-sim-{seed}.trace"));
            let written = std::fs::write(&path, world.trace.join("\n"));
            let tail: Vec<&String> = world.trace.iter().rev().take(200).collect();
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
            let whole = match written {
                Ok(()) => format!("the whole trace is in {}", path.display()),
                Err(e) => format!("the trace could not be written: {e}"),
            };
            panic!("seed {seed}: {violation}\n{whole}\nreplay with RIDELOCK_SIM_SEED={seed}");
        }
        if replay.is_some() || (events >= min_events && seeds >= 64) {
            break;
        }
        seed += 1;
    }
    // Written to stderr directly (not through the harness's capture), so
    // that every `cargo test` shows it.
    let _ = writeln!(
        std::io::stderr(),
        "simulated {events} events over {seeds} seeds, {faults} faults injected, 0 invariant violations; \
         groups: {groups_matched} matched, {groups_failed} not, {preemptions} drivers taken by older groups"
    );
    // The run must have exercised what it checks.
    if replay.is_none() {
        assert!(
            groups_matched > 0 && groups_failed > 0,
            "no group requests were decided"
        );
        assert!(
            preemptions > 0,
            "no group ever took a driver from a younger one"
        );
    }
}
