//! One WebSocket connection: read frames, parse them, hand commands on; write
//! what the engine sends back.
//!
//! Sessions are tokio tasks on the multi-threaded runtime, so parsing and
//! socket I/O use every core; the actors they talk to run on actix arbiters.
//! A session never blocks on an actor: commands go by `do_send`, answers come
//! back through the connection's [`Outbox`].

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::config::Config;
use crate::metrics as m;
use crate::protocol::{Command, ErrorCode, ServerMessage};

/// An upgraded client connection.
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// Most outgoing messages written before one flush.
const WRITE_BATCH: u64 = 64;
/// Over-limit frames are answered with one `rate_limited` error per window,
/// not one each: a flood must not make the engine write a flood back.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// A connection whose dropped frames, less one second's allowance for every
/// quiet window since, exceed this many seconds' worth of its allowance is
/// flooding and is closed with 1008.
const FLOOD_SECONDS: u32 = 10;
/// Longest the close handshake may take once the engine decided to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How one connection is run: the limits and timers from the engine's
/// configuration.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Frames per second allowed, sustained (bursts of twice that).
    pub max_messages_per_s: u32,
    /// How often the engine pings.
    pub ping_interval: Duration,
    /// Silence after which the connection is closed with 1001.
    pub client_timeout: Duration,
    /// Longest one write may take.
    pub write_timeout: Duration,
}

impl Settings {
    /// The settings `config` asks for.
    pub fn from_config(config: &Config) -> Self {
        Settings {
            max_messages_per_s: config.max_messages_per_s,
            ping_interval: config.ping_interval(),
            client_timeout: config.client_timeout(),
            write_timeout: config.write_timeout(),
        }
    }
}

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
    /// A new outbox holding up to `capacity` messages, and the receiving end
    /// its session drains.
    pub fn new(capacity: usize) -> (Outbox, Inbox) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
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

/// Per-connection allowance of frames: a token bucket, so normal bursts pass
/// and a flood is dropped, answered once per [`RATE_WINDOW`], and closed when
/// it goes on.
struct RateLimit {
    per_s: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
    window_started: Instant,
    dropped_in_window: u32,
    told_in_window: bool,
    /// Frames dropped beyond what quiet windows since forgave.
    excess: u32,
    excess_limit: u32,
    /// The allowance of one window, in frames.
    per_window: u32,
}

/// What to do with one incoming frame.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Allow,
    /// Drop it and say why (the first drop of a window).
    DropAndTell,
    /// Drop it silently.
    Drop,
    /// The connection keeps flooding: close it.
    Close,
}

impl RateLimit {
    fn new(per_s: u32, now: Instant) -> Self {
        let per_s = per_s.max(1);
        let rate = f64::from(per_s);
        RateLimit {
            per_s: rate,
            burst: rate * 2.0,
            tokens: rate * 2.0,
            refilled: now,
            window_started: now,
            dropped_in_window: 0,
            told_in_window: false,
            excess: 0,
            excess_limit: per_s.saturating_mul(FLOOD_SECONDS),
            per_window: per_s,
        }
    }

    fn check(&mut self, now: Instant) -> Verdict {
        let since = now.duration_since(self.window_started);
        if since >= RATE_WINDOW {
            // Every quiet window (one without drops, or one with no frame at
            // all, which never rolled over) forgives one second's worth of
            // excess; a flood that pauses now and then still adds up.
            let windows = (since.as_millis() / RATE_WINDOW.as_millis()) as u32;
            let quiet = if self.dropped_in_window == 0 {
                windows
            } else {
                windows - 1
            };
            self.excess = self
                .excess
                .saturating_sub(quiet.saturating_mul(self.per_window));
            self.window_started = now;
            self.dropped_in_window = 0;
            self.told_in_window = false;
        }
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.per_s;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allow;
        }
        self.dropped_in_window += 1;
        self.excess += 1;
        if self.excess > self.excess_limit {
            Verdict::Close
        } else if !self.told_in_window {
            self.told_in_window = true;
            Verdict::DropAndTell
        } else {
            Verdict::Drop
        }
    }
}

/// Every close code the engine sends (docs/protocol.md lists each, and a
/// test holds the two lists equal): going away, protocol error, invalid
/// data, policy, too big.
pub const CLOSE_CODES: [u16; 5] = [1001, 1002, 1007, 1008, 1009];

/// How a session ended, and what the client is told.
fn close_frame(code: CloseCode, reason: &'static str) -> Option<CloseFrame> {
    debug_assert!(
        CLOSE_CODES.contains(&u16::from(code)),
        "{code:?} is not in CLOSE_CODES"
    );
    Some(CloseFrame {
        code,
        reason: reason.into(),
    })
}

/// Waits until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Runs one connection until it closes, the engine drops it, its token
/// expires (`expires`), or the engine shuts down.
pub async fn run<P: Peer>(
    mut ws: Socket,
    mut peer: P,
    mut outbox: Inbox,
    settings: Settings,
    expires: Option<Instant>,
    mut shutdown: watch::Receiver<bool>,
) {
    m::connection_opened(P::ROLE);
    let per_s = settings.max_messages_per_s;
    let write_timeout = settings.write_timeout;
    let mut rate = RateLimit::new(per_s, Instant::now());
    let mut heartbeat = tokio::time::interval_at(
        Instant::now() + settings.ping_interval,
        settings.ping_interval,
    );
    let mut last_heard = Instant::now();
    let token_expiry = sleep_until_some(expires);
    tokio::pin!(token_expiry);
    let close = loop {
        tokio::select! {
            incoming = ws.next() => {
                let now = Instant::now();
                let frame = match incoming {
                    Some(Ok(Message::Close(_))) | None => break Closing::ByPeer,
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => break Closing::after_error(P::ROLE, e),
                };
                last_heard = now;
                // Every frame the client sends costs the engine work, so every
                // kind counts against the allowance, pings included.
                let verdict = rate.check(now);
                let reply = match (verdict, frame) {
                    (Verdict::Close, _) => {
                        m::flood_closed();
                        break Closing::Engine(close_frame(CloseCode::Policy, "flooding: too many frames for too long"));
                    }
                    (Verdict::Drop, _) => { m::frame_dropped(); None }
                    (Verdict::DropAndTell, _) => {
                        m::frame_dropped();
                        Some(ServerMessage::error(
                            ErrorCode::RateLimited,
                            format!("at most {per_s} messages per second; frames past it are dropped (this notice comes once a second)"),
                        ))
                    }
                    (Verdict::Allow, Message::Text(text)) => {
                        m::ws_message_in();
                        match P::Command::parse(&text) {
                            Ok(command) => peer.deliver(command).err(),
                            Err(e) => Some(e.into()),
                        }
                    }
                    (Verdict::Allow, Message::Binary(_)) => {
                        Some(ServerMessage::error(ErrorCode::BinaryNotSupported, "send JSON in text frames"))
                    }
                    // tungstenite answers pings by itself.
                    (Verdict::Allow, _) => None,
                };
                if let Some(reply) = reply {
                    if write_error(&mut ws, reply, write_timeout).await.is_err() {
                        break Closing::Dropped;
                    }
                }
            }
            message = outbox.queue.recv() => match message {
                Some(message) => {
                    if within(write_timeout, write_batch(&mut ws, message, &mut outbox.queue)).await.is_err() {
                        break Closing::Dropped;
                    }
                }
                // Every sender is gone: the driver's actor let go of this
                // connection (a newer one replaced it, or this one stopped
                // reading). It gets nothing more.
                None => break Closing::Engine(close_frame(CloseCode::Policy, "replaced by a newer connection, or not reading")),
            },
            _ = outbox.overflowed.notified() => {
                break Closing::Engine(close_frame(CloseCode::Policy, "not reading its messages"));
            }
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
    // Let go of the driver or the searches first: the engine must stop
    // counting on this client at once, not after a slow close handshake.
    peer.closed();
    m::connection_closed(P::ROLE);
    match close {
        // tungstenite queued the reply to the client's close frame; a flush
        // writes it, so the client sees its own code echoed, not 1006.
        // (close() would refuse: tungstenite sends nothing after a close.)
        Closing::ByPeer => {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.flush()).await;
        }
        // Send the close frame, then read (and discard) until the client's
        // reply: closing a socket with unread input makes the kernel reset
        // it, and a reset can destroy the close frame before the client reads
        // it. Bounded by CLOSE_TIMEOUT, so a client that keeps sending costs
        // no more than that.
        Closing::Engine(frame) => {
            let handshake = async {
                if ws.close(frame).await.is_ok() {
                    while let Some(Ok(_)) = ws.next().await {}
                }
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
        }
        Closing::Dropped => {}
    }
}

/// Why the session loop ended.
enum Closing {
    /// The client sent a close frame (or its stream ended).
    ByPeer,
    /// The engine closes, with this frame.
    Engine(Option<CloseFrame>),
    /// The socket is unusable: nothing more can be written.
    Dropped,
}

impl Closing {
    /// The close that follows a read error: too large a message is 1009, a
    /// broken frame 1002, text that is not UTF-8 1007; an I/O error leaves
    /// nothing to close.
    fn after_error(role: &'static str, e: WsError) -> Closing {
        tracing::debug!(role, "connection error: {e}");
        match e {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
                Closing::Engine(close_frame(CloseCode::Size, "message too big"))
            }
            WsError::Capacity(_) => Closing::Engine(close_frame(CloseCode::Size, "frame too big")),
            WsError::Protocol(_) => Closing::Engine(close_frame(
                CloseCode::Protocol,
                "WebSocket protocol violation",
            )),
            WsError::Utf8(_) => Closing::Engine(close_frame(
                CloseCode::Invalid,
                "text frame is not valid UTF-8",
            )),
            _ => Closing::Dropped,
        }
    }
}

async fn write_error(
    ws: &mut Socket,
    message: ServerMessage,
    write_timeout: Duration,
) -> Result<(), WsError> {
    if let ServerMessage::Error { code, .. } = &message {
        m::protocol_error(*code);
    }
    m::ws_messages_out(1);
    within(write_timeout, ws.send(encode(&message))).await
}

/// Runs a write, failing it if the client hasn't taken it within `limit`.
async fn within(
    limit: Duration,
    write: impl std::future::Future<Output = Result<(), WsError>>,
) -> Result<(), WsError> {
    match tokio::time::timeout(limit, write).await {
        Ok(result) => result,
        Err(_) => Err(WsError::Io(std::io::ErrorKind::TimedOut.into())),
    }
}

/// Writes `first` and whatever else is already queued, then flushes once.
async fn write_batch(
    ws: &mut Socket,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_and_a_flood_is_told_once_per_window_then_closed() {
        let start = Instant::now();
        let mut rate = RateLimit::new(10, start);
        // The burst: twice the rate.
        for _ in 0..20 {
            assert_eq!(rate.check(start), Verdict::Allow);
        }
        assert_eq!(rate.check(start), Verdict::DropAndTell);
        for _ in 0..50 {
            assert_eq!(rate.check(start), Verdict::Drop);
        }
        // A new window: told again, and one token earned per 100 ms.
        let later = start + RATE_WINDOW;
        let mut verdicts: Vec<Verdict> = (0..12).map(|_| rate.check(later)).collect();
        assert_eq!(
            verdicts.iter().filter(|v| **v == Verdict::Allow).count(),
            10
        );
        assert_eq!(
            verdicts
                .iter()
                .filter(|v| **v == Verdict::DropAndTell)
                .count(),
            1
        );
        verdicts.clear();
        // 10 s worth of allowance (100 frames) beyond the limit closes it.
        let mut closed = false;
        for _ in 0..100 {
            if rate.check(later) == Verdict::Close {
                closed = true;
                break;
            }
        }
        assert!(closed, "a flood past {FLOOD_SECONDS} s of allowance closes");
    }

    #[test]
    fn silence_forgives_earlier_excess() {
        let start = Instant::now();
        let mut rate = RateLimit::new(1, start);
        let mut now = start;
        // Floods of 9 excess frames (under the 10 that close), each after a
        // silence long enough to forgive them: never closed.
        for _ in 0..20 {
            let verdicts: Vec<_> = (0..11).map(|_| rate.check(now)).collect();
            assert!(!verdicts.contains(&Verdict::Close), "{verdicts:?}");
            now += RATE_WINDOW * 12;
        }
        // Without the silences they add up.
        let verdicts: Vec<_> = (0..30).map(|_| rate.check(now)).collect();
        assert!(verdicts.contains(&Verdict::Close));
    }

    #[test]
    fn a_flood_that_pauses_now_and_then_is_still_closed() {
        // Found in review: resetting the excess after any quiet window let a
        // client flood one second in two, forever.
        let start = Instant::now();
        let mut rate = RateLimit::new(50, start);
        let mut now = start;
        let mut closed = false;
        for _ in 0..10 {
            // One second of 300 frames, then one second of silence.
            for _ in 0..300 {
                if rate.check(now) == Verdict::Close {
                    closed = true;
                }
            }
            now += RATE_WINDOW * 2;
        }
        assert!(
            closed,
            "a flood at three times the allowance, paused every other second"
        );
    }

    #[test]
    fn a_quiet_window_forgives_earlier_excess() {
        let start = Instant::now();
        let mut rate = RateLimit::new(1, start);
        let mut now = start;
        // Three frames a second at a limit of one: dropped, told, never
        // closed as long as a window without drops follows each burst.
        for _ in 0..100 {
            for _ in 0..3 {
                assert_ne!(rate.check(now), Verdict::Close);
            }
            now += RATE_WINDOW;
            assert_eq!(rate.check(now), Verdict::Allow); // refilled
            now += RATE_WINDOW * 3;
        }
    }
}
