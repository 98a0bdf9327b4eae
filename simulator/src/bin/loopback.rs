//! `loopback`: the plain WebSocket limit of this machine, for comparison.
//!
//! `loopback serve` is an echo server (tokio-tungstenite, multi-threaded
//! runtime, the engine's buffer sizes); `loopback bench` measures it from
//! another process with location-sized messages:
//! - one-way: clients only send, the server counts what it reads (the shape
//!   of location updates);
//! - echo: clients keep a window of messages in flight and count round trips;
//! - latency: one client, one message at a time, round-trip percentiles.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use simulator::net::{self, Target};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// A location update as the engine receives it (same size on the wire).
const PAYLOAD: &str = r#"{"type":"location","lat":52.520008,"lon":13.404954}"#;
/// A message asking the server for its count of one-way messages.
const COUNT_QUERY: &str = "count?";

#[derive(Parser)]
#[command(name = "loopback", about = "Plain WebSocket loopback limits")]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Serve: echo text frames, except one-way ones, which are only counted.
    Serve {
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: String,
    },
    /// Measure a `loopback serve` process.
    Bench {
        #[arg(long, default_value = "ws://127.0.0.1:9001")]
        url: String,
        /// Concurrent connections for the throughput phases.
        #[arg(long, default_value_t = 200)]
        connections: usize,
        /// Length of each throughput phase.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        duration: Duration,
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
}

#[derive(Serialize, Debug)]
struct LoopbackReport {
    message_bytes: usize,
    connections: usize,
    one_way_msgs_per_s: f64,
    echo_round_trips_per_s: f64,
    rtt_ms_p50: f64,
    rtt_ms_p99: f64,
    rtt_ms_max: f64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    net::raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Mode::Serve { listen } => serve(&listen).await,
            Mode::Bench {
                url,
                connections,
                duration,
                json,
            } => {
                let report = bench(&url, connections, duration).await?;
                println!("{report:#?}");
                if let Some(path) = json {
                    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                Ok(())
            }
        }
    })
}

async fn serve(listen: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!("loopback echo server on {}", listener.local_addr()?);
    let one_way = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let one_way = one_way.clone();
        tokio::spawn(async move {
            let config = ridelock::session::websocket_config(4096);
            let Ok(mut ws) =
                tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
            else {
                return;
            };
            while let Some(Ok(message)) = ws.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                if text.as_str() == COUNT_QUERY {
                    let count = one_way.load(Ordering::Relaxed).to_string();
                    if ws.send(Message::text(count)).await.is_err() {
                        return;
                    }
                } else if text.as_str().starts_with('1') {
                    // One-way messages carry a leading '1': read and counted,
                    // like location updates.
                    one_way.fetch_add(1, Ordering::Relaxed);
                } else if ws.send(Message::Text(text)).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn server_count(target: &Target) -> anyhow::Result<u64> {
    let mut ws = target.connect("/", None, None).await?;
    ws.send(Message::text(COUNT_QUERY)).await?;
    match ws.next().await {
        Some(Ok(Message::Text(text))) => Ok(text.parse()?),
        other => anyhow::bail!("unexpected answer to the count query: {other:?}"),
    }
}

async fn bench(
    url: &str,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<LoopbackReport> {
    let target = Target::resolve(url).await?;
    let one_way_payload: String = format!("1{}", &PAYLOAD[1..]);

    // One-way: every connection sends as fast as it can, one message per
    // write like a driver app sending its location (no batching).
    let before = server_count(&target).await?;
    let start = Instant::now();
    let until = start + duration;
    let mut tasks = Vec::new();
    for n in 0..connections {
        let target = target.clone();
        let payload = one_way_payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = target
                .connect("/", None, target.source_for(n, connections))
                .await?;
            while Instant::now() < until {
                ws.send(Message::text(payload.clone())).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    // Let the server read what is still in its sockets before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let one_way = (server_count(&target).await? - before) as f64 / start.elapsed().as_secs_f64();

    // Echo: a window of messages in flight per connection.
    let round_trips = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + duration;
    let mut tasks = Vec::new();
    for n in 0..connections {
        let target = target.clone();
        let round_trips = round_trips.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = target
                .connect("/", None, target.source_for(n, connections))
                .await?;
            const WINDOW: usize = 16;
            for _ in 0..WINDOW {
                ws.feed(Message::text(PAYLOAD)).await?;
            }
            ws.flush().await?;
            while let Some(message) = ws.next().await {
                message?;
                round_trips.fetch_add(1, Ordering::Relaxed);
                if Instant::now() >= until {
                    break;
                }
                ws.send(Message::text(PAYLOAD)).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let echo = round_trips.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();

    // Latency: one message at a time on one connection.
    let mut ws = target.connect("/", None, None).await?;
    let mut rtt = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for _ in 0..20_000 {
        let sent = Instant::now();
        ws.send(Message::text(PAYLOAD)).await?;
        ws.next().await.context("server closed")??;
        rtt.record(sent.elapsed().as_micros().max(1) as u64)?;
    }
    Ok(LoopbackReport {
        message_bytes: PAYLOAD.len(),
        connections,
        one_way_msgs_per_s: one_way,
        echo_round_trips_per_s: echo,
        rtt_ms_p50: rtt.value_at_quantile(0.5) as f64 / 1000.0,
        rtt_ms_p99: rtt.value_at_quantile(0.99) as f64 / 1000.0,
        rtt_ms_max: rtt.max() as f64 / 1000.0,
    })
}
