//! A flooding client: a rider connection that sends frames as fast as the
//! socket takes them and reconnects whenever the engine closes it, to
//! measure what a flood costs everybody else (their request→offer latency).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use ridelock::auth::Role;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::args::FloodKind;
use crate::run::Shared;

/// Frames written between flushes (and between looks at what came back).
const BATCH: usize = 64;
/// Pause before reconnecting after the engine closed the connection.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

/// Floods from connection `n` until `until`.
pub async fn run(n: usize, shared: Arc<Shared>, until: Instant) {
    let id = format!("sim-{}flood{n}", shared.plan.id_prefix);
    let frame = match shared.plan.flood_kind {
        FloodKind::Text => Message::text(r#"{"type":"cancel","request_id":"flood"}"#),
        FloodKind::Binary => Message::binary(vec![0u8; 51]),
        FloodKind::Ping => Message::Ping(vec![0u8; 8].into()),
    };
    let index = shared.total_connections - 1 - n;
    let target = shared.target_for(index);
    let source = shared.source_for(target, index);
    while Instant::now() < until {
        let (path, token) = shared.credentials(Role::Rider, &id);
        let mut ws = match target.connect(&path, token.as_deref(), source).await {
            Ok(ws) => ws,
            Err(e) => {
                shared.stats.connect_failed(&e);
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        'connection: while Instant::now() < until {
            // Frames handed to the socket: the engine reads them at the
            // connection's allowance, and the kernel buffers hold the rest.
            // A failed write means the engine closed the connection.
            for _ in 0..BATCH {
                if ws.feed(frame.clone()).await.is_err() {
                    shared.stats.flood_closes.inc();
                    break 'connection;
                }
                shared.stats.flood_frames.inc();
            }
            if ws.flush().await.is_err() {
                shared.stats.flood_closes.inc();
                break;
            }
            // Read whatever came back without waiting: the engine's errors,
            // pongs, or its close.
            while let Some(Some(incoming)) = ws.next().now_or_never() {
                match incoming {
                    Ok(Message::Close(_)) | Err(_) => {
                        shared.stats.flood_closes.inc();
                        break 'connection;
                    }
                    Ok(_) => {}
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}
