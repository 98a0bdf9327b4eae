//! One watcher's connection to `/ws/ops`: a snapshot, then batches, until
//! the watcher leaves, stops reading, its token expires or the engine shuts
//! down. The feed is one-way: a watcher sends nothing but control frames.

use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use super::feed::{Next, OpsFeed};
use crate::metrics as m;
use crate::session::{self, close_frame, within, Closing, Settings, Socket};

/// The WebSocket settings of a watcher: a snapshot of a whole city is one
/// message of a megabyte or more, so the write buffer may grow that far
/// (watchers are few: at most [`MAX_WATCHERS`](super::feed::MAX_WATCHERS));
/// what a watcher may send stays tiny.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(MAX_SNAPSHOT_BYTES)
        .max_message_size(Some(1024))
        .max_frame_size(Some(1024))
}

/// Largest message the feed can send: a snapshot of about a million drivers.
const MAX_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;

/// Runs one watcher's connection until it ends.
pub async fn run(
    mut ws: Socket,
    feed: &std::sync::Arc<OpsFeed>,
    settings: Settings,
    expires: Option<Instant>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(mut watch) = feed.watch() else {
        let refusal = close_frame(CloseCode::Again, "too many ops watchers; retry later");
        session::finish(ws, Closing::Engine(refusal)).await;
        return;
    };
    m::connection_opened("ops");
    let write_timeout = settings.write_timeout;
    let mut heartbeat = tokio::time::interval_at(
        Instant::now() + settings.ping_interval,
        settings.ping_interval,
    );
    let mut last_heard = Instant::now();
    let token_expiry = session::sleep_until_some(expires);
    tokio::pin!(token_expiry);
    let mut next = tokio::select! {
        snapshot = watch.snapshot() => Some(snapshot),
        _ = shutdown.changed() => {
            drop(watch);
            m::connection_closed("ops");
            session::finish(ws, Closing::Engine(close_frame(CloseCode::Away, "server shutting down"))).await;
            return;
        }
    };
    let close = loop {
        if let Some(text) = next.take() {
            // A watcher that can't take a batch within the write timeout is
            // dropped rather than buffered for.
            if within(write_timeout, ws.send(Message::Text(text)))
                .await
                .is_err()
            {
                break Closing::Dropped;
            }
            m::ws_messages_out(1);
        }
        tokio::select! {
            message = watch.next() => match message {
                Next::Send(text) => next = Some(text),
                Next::Closed => break Closing::Engine(close_frame(CloseCode::Away, "server shutting down")),
            },
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Close(_))) | None => break Closing::ByPeer,
                Some(Err(e)) => break Closing::after_error("ops", e),
                Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                    break Closing::Engine(close_frame(CloseCode::Policy, "the ops feed takes no messages"));
                }
                // Pings (tungstenite answers them) and pongs.
                Some(Ok(_)) => last_heard = Instant::now(),
            },
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > settings.client_timeout {
                    break Closing::Engine(close_frame(CloseCode::Away, "no frames within the client timeout"));
                }
                if within(write_timeout, ws.send(Message::Ping(Default::default()))).await.is_err() {
                    break Closing::Dropped;
                }
            }
            _ = &mut token_expiry => {
                break Closing::Engine(close_frame(CloseCode::Policy, "token expired: reconnect with a fresh one"));
            }
            _ = shutdown.changed() => break Closing::Engine(close_frame(CloseCode::Away, "server shutting down")),
        }
    };
    drop(watch);
    m::connection_closed("ops");
    session::finish(ws, close).await;
}
