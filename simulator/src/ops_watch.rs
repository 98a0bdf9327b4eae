//! A watcher of the ops feed (`/ws/ops`), as the ops map is: it reads every
//! snapshot and batch until the run stops, counting what it received, so
//! that a run with watchers and one without show what the feed costs the
//! engine.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use ridelock::auth::Role;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::run::Shared;

/// Largest feed message taken: a snapshot of a whole node.
const MAX_FEED_MESSAGE: usize = 64 * 1024 * 1024;

/// Watches from connection `n`, from `start_at` (the end of the ramp, so
/// that its snapshot holds the whole city) until `stopped` turns true.
pub async fn run(
    n: usize,
    shared: Arc<Shared>,
    start_at: Instant,
    mut stopped: watch::Receiver<bool>,
) {
    tokio::time::sleep_until(start_at).await;
    let id = format!("sim-{}ops{n}", shared.plan.id_prefix);
    // The last connections of the run's budget (before the floods').
    let index = shared.total_connections - 1 - shared.plan.flood - n;
    let target = shared.target_for(index);
    let source = shared.source_for(target, index);
    let (path, token) = shared.credentials(Role::Ops, &id);
    let config = crate::net::client_config()
        .max_message_size(Some(MAX_FEED_MESSAGE))
        .max_frame_size(Some(MAX_FEED_MESSAGE));
    let mut ws = match target
        .connect_with(&path, token.as_deref(), source, config)
        .await
    {
        Ok(ws) => ws,
        Err(e) => {
            shared.stats.connect_failed(&e);
            return;
        }
    };
    let stats = &shared.stats;
    loop {
        let frame = tokio::select! {
            frame = ws.next() => frame,
            _ = stopped.changed() => break,
        };
        match frame {
            Some(Ok(Message::Text(text))) => {
                stats.ops_messages.inc();
                stats.ops_bytes.add(text.len() as u64);
                if text.starts_with(r#"{"type":"snapshot""#) {
                    stats.ops_snapshot_bytes.raise_to(text.len() as u64);
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
}
