//! `simulator`: drives a running ridelock engine like a city does.
//!
//! Exit status: 0 when no invariant was broken, 1 when one was, 2 when the
//! run could not be made (bad flags, engine unreachable).

use anyhow::Context;
use clap::Parser;
use simulator::args::Args;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("simulator: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<u64> {
    let args = Args::parse();
    let plan = args.plan()?;
    let secret = args.secret()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let worker = plan.emit_events;
    let report = if plan.workers > 1 {
        let user_args: Vec<String> = std::env::args().skip(1).collect();
        runtime.block_on(simulator::workers::run(
            plan,
            secret,
            &user_args,
            &args.engine_pid,
            !args.quiet,
        ))?
    } else {
        runtime.block_on(simulator::run::run(
            plan,
            secret,
            &args.engine_pid,
            !args.quiet,
        ))?
    };
    if worker {
        // Its stdout carried the events; the coordinator reports.
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        return Ok(report.violations);
    }
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    // Dropping the runtime would wait for client tasks still closing sockets.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(report.violations)
}
