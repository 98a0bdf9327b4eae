//! One WebSocket connection: read frames, parse them, hand commands on; write
//! what the engine sends back.
//!
//! Sessions are tokio tasks on the multi-threaded runtime, so parsing and
//! socket I/O use every core; the actors they talk to run on actix arbiters.
//! A session never blocks on an actor: commands go by `do_send`, answers come
//! back through the connection's [`Outbox`].

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use tokio::net::TcpStream;

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::metrics as m;
use crate::protocol::{Command, ErrorCode, ServerMessage};

/// Messages the engine may queue for one connection before it is judged not
/// to be reading and is dropped.
pub const OUTBOX_CAPACITY: usize = 256;
/// How often the engine pings an idle connection.
pub const PING_INTERVAL: Duration = Duration::from_secs(20);
/// A connection silent for this long (no frame, not even a pong) is dropped,
/// so that a driver whose phone vanished stops being offered.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a write may take: a client that lets its socket buffer fill for
/// this long is not reading, and is disconnected rather than left to pin its
/// session.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most outgoing messages written before one flush.
const WRITE_BATCH: u64 = 64;

/// Where the engine's messages for one connection go. Sending never waits: a
/// full outbox means the client stopped reading, and the sender drops it.
///
/// Messages travel boxed: the channel allocates its slots in blocks of 32 up
/// front, and 32 pointers cost a tenth of 32 unboxed messages on every idle
/// connection.
#[derive(Clone, Debug)]
pub struct Outbox {
    queue: mpsc::Sender<Box<ServerMessage>>,
    /// Raised when the queue overflows: the session closes the connection,
    /// since a client that doesn't read can't be told anything reliably.
    overflowed: Arc<Notify>,
}

/// The receiving end of an [`Outbox`], drained by the connection's session.
pub struct Inbox {
    queue: mpsc::Receiver<Box<ServerMessage>>,
    overflowed: Arc<Notify>,
}

impl Outbox {
    /// A new outbox and the receiving end its session drains.
    pub fn new() -> (Outbox, Inbox) {
        let (tx, rx) = mpsc::channel(OUTBOX_CAPACITY);
        let overflowed = Arc::new(Notify::new());
        let inbox = Inbox {
            queue: rx,
            overflowed: overflowed.clone(),
        };
        (
            Outbox {
                queue: tx,
                overflowed,
            },
            inbox,
        )
    }

    /// Queues `message`; `false` if the connection is gone or not reading
    /// (and then the connection is closed: nothing sent later could be
    /// trusted to arrive after this loss).
    pub fn send(&self, message: ServerMessage) -> bool {
        match self.queue.try_send(Box::new(message)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflowed.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// The WebSocket settings for every connection. tungstenite's defaults
/// (128 KiB read and write buffers, 64 MiB messages) would cost ~256 KiB per
/// idle connection and let one client make the engine buffer megabytes.
pub fn websocket_config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(2 * 1024)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}

/// What a session hands its commands to: a driver actor or the matcher.
pub trait Peer: Send + 'static {
    /// The commands this endpoint accepts.
    type Command: Command + Send;
    /// Label for metrics and logs.
    const ROLE: &'static str;
    /// A valid command arrived; an `Err` is sent back to the client.
    fn deliver(&mut self, command: Self::Command) -> Result<(), ServerMessage>;
    /// The connection ended, for whatever reason.
    fn closed(self);
}

/// Per-connection allowance of messages: a token bucket, so a flood gets
/// `rate_limited` errors while normal bursts pass.
struct RateLimit {
    per_s: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl RateLimit {
    fn new(per_s: u32) -> Self {
        let per_s = f64::from(per_s.max(1));
        RateLimit {
            per_s,
            burst: per_s * 2.0,
            tokens: per_s * 2.0,
            refilled: Instant::now(),
        }
    }

    fn allow(&mut self, now: Instant) -> bool {
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.per_s;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How a session ended, and what the client is told.
fn close_frame(code: CloseCode, reason: &'static str) -> Option<CloseFrame> {
    Some(CloseFrame {
        code,
        reason: reason.into(),
    })
}

/// Runs one connection until it closes, the engine drops it, or the engine
/// shuts down.
pub async fn run<P: Peer>(
    mut ws: WebSocketStream<TcpStream>,
    mut peer: P,
    mut outbox: Inbox,
    max_messages_per_s: u32,
    mut shutdown: watch::Receiver<bool>,
) {
    m::connection_opened(P::ROLE);
    let mut rate = RateLimit::new(max_messages_per_s);
    let mut heartbeat = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
    let mut last_heard = Instant::now();
    let close = loop {
        tokio::select! {
            incoming = ws.next() => {
                let now = Instant::now();
                match incoming {
                    Some(Ok(Message::Text(text))) => {
                        last_heard = now;
                        m::ws_message_in();
                        let reply = if !rate.allow(now) {
                            Some(ServerMessage::error(
                                ErrorCode::RateLimited,
                                format!("at most {max_messages_per_s} messages per second; this one was dropped"),
                            ))
                        } else {
                            match P::Command::parse(&text) {
                                Ok(command) => peer.deliver(command).err(),
                                Err(e) => Some(e.into()),
                            }
                        };
                        if let Some(reply) = reply {
                            if write_error(&mut ws, reply).await.is_err() {
                                break None;
                            }
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        last_heard = now;
                        let reply = ServerMessage::error(ErrorCode::BinaryNotSupported, "send JSON in text frames");
                        if write_error(&mut ws, reply).await.is_err() {
                            break None;
                        }
                    }
                    // tungstenite answers pings and close frames by itself.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => last_heard = now,
                    Some(Ok(Message::Close(_))) | None => break None,
                    Some(Err(WsError::Capacity(e))) => {
                        tracing::debug!(role = P::ROLE, "closing connection: {e}");
                        let reason = match e {
                            CapacityError::MessageTooLong { .. } => "message too big",
                            _ => "frame too big",
                        };
                        break close_frame(CloseCode::Size, reason);
                    }
                    Some(Err(e)) => {
                        tracing::debug!(role = P::ROLE, "connection error: {e}");
                        break None;
                    }
                }
            }
            message = outbox.queue.recv() => match message {
                Some(message) => {
                    if within_write_timeout(write_batch(&mut ws, message, &mut outbox.queue)).await.is_err() {
                        break None;
                    }
                }
                // Every sender is gone: the driver's actor let go of this
                // connection (a newer one replaced it, or this one stopped
                // reading). It gets nothing more.
                None => break close_frame(CloseCode::Policy, "replaced by a newer connection, or not reading"),
            },
            _ = outbox.overflowed.notified() => {
                break close_frame(CloseCode::Policy, "not reading its messages");
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > CLIENT_TIMEOUT {
                    break close_frame(CloseCode::Away, "no frames within the client timeout");
                }
                if within_write_timeout(ws.send(Message::Ping(Default::default()))).await.is_err() {
                    break None;
                }
            }
            _ = shutdown.changed() => break close_frame(CloseCode::Away, "server shutting down"),
        }
    };
    // Let go of the driver or the searches first: the engine must stop
    // counting on this client at once, not after a slow close handshake.
    peer.closed();
    m::connection_closed(P::ROLE);
    if close.is_some() {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(close)).await;
    }
}

async fn write_error(
    ws: &mut WebSocketStream<TcpStream>,
    message: ServerMessage,
) -> Result<(), WsError> {
    if let ServerMessage::Error { code, .. } = &message {
        m::protocol_error(*code);
    }
    m::ws_messages_out(1);
    within_write_timeout(ws.send(encode(&message))).await
}

/// Runs a write, failing it if the client hasn't taken it within
/// [`WRITE_TIMEOUT`].
async fn within_write_timeout(
    write: impl std::future::Future<Output = Result<(), WsError>>,
) -> Result<(), WsError> {
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(result) => result,
        Err(_) => Err(WsError::Io(std::io::ErrorKind::TimedOut.into())),
    }
}

/// Writes `first` and whatever else is already queued, then flushes once.
async fn write_batch(
    ws: &mut WebSocketStream<TcpStream>,
    first: Box<ServerMessage>,
    outbox: &mut mpsc::Receiver<Box<ServerMessage>>,
) -> Result<(), WsError> {
    ws.feed(encode(&first)).await?;
    let mut written: u64 = 1;
    while written < WRITE_BATCH {
        match outbox.try_recv() {
            Ok(message) => {
                ws.feed(encode(&message)).await?;
                written += 1;
            }
            Err(_) => break,
        }
    }
    m::ws_messages_out(written);
    ws.flush().await
}

fn encode(message: &ServerMessage) -> Message {
    // Serialising these types cannot fail: plain structs and enums, no maps
    // with non-string keys, no custom serialisers that error.
    Message::text(serde_json::to_string(message).expect("server messages always serialise"))
}
