//! The `ridelock` binary: parse flags, set up logging, serve until SIGINT or
//! SIGTERM; or `ridelock token`, which prints a signed token.

use anyhow::Context;
use clap::Parser;
use ridelock::config::{Cli, TokenArgs, Tool};
use ridelock::{auth, Config, Engine};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    if let Some(Tool::Token(args)) = cli.tool {
        return print_token(args);
    }
    let config = cli.config;
    let open_files = ridelock::limits::raise_open_file_limit();
    tracing::info!(open_files, "open-file limit (one per connection)");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.io_threads())
        // Socket I/O yields to the matcher when cores are short (see
        // `BUSY_THREAD_NICENESS`).
        .on_thread_start(|| {
            ridelock::limits::lower_this_thread(ridelock::limits::BUSY_THREAD_NICENESS)
        })
        .enable_all()
        .build()
        .context("starting the I/O runtime")?
        .block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Handlers first: a signal that arrives while the engine starts must stop
    // it cleanly, not kill the process with the default action.
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let engine = Engine::start(config).await.context("starting the engine")?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
    engine.shutdown().await;
    Ok(())
}

fn print_token(args: TokenArgs) -> anyhow::Result<()> {
    auth::check_id(&args.id).context("--id")?;
    // Short-lived tokens are the point (there is no revocation list).
    anyhow::ensure!(
        args.ttl <= std::time::Duration::from_secs(366 * 24 * 3600),
        "--ttl: at most a year"
    );
    let secret = auth::read_secret(&args.auth_secret_file)?;
    println!("{}", auth::mint(&secret, args.role, &args.id, args.ttl));
    Ok(())
}
