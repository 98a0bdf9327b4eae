//! One WebSocket connection: read frames, parse them, hand commands on; write
//! what the engine sends back.
//!
//! Sessions are tokio tasks on the multi-threaded runtime, so parsing and
//! socket I/O use every core; the actors they talk to run on actix arbiters.
//! A session never blocks on an actor: commands go by `do_send`, answers come
//! back through the connection's [`Outbox`].

use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
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
/// A client that keeps the engine waiting for its allowance is told
/// `rate_limited` once per window of this length, not once per frame.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// A connection that had frames waiting for its allowance in this many
/// windows in a row is flooding, and is closed with 1008.
const FLOOD_SECONDS: u32 = 10;
/// Frames read (and discarded) at most while waiting for a client's reply to
/// the engine's close frame: a flooder's backlog is not worth reading.
const CLOSE_DRAIN_FRAMES: usize = 64;
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

/// Per-connection allowance of frames: a token bucket. The session reads a
/// frame only when a token is there; past the allowance it stops reading,
/// and TCP makes the client wait, so a flood costs the sender, not the
/// engine (frames beyond the allowance are never even parsed).
struct RateLimit {
    per_s: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
    /// Where windows are counted from.
    epoch: Instant,
    /// The last window in which a frame had to wait, and how many windows in
    /// a row ending there had one.
    pressed_window: Option<u64>,
    pressed_run: u32,
}

/// What to do when a frame is waiting and the allowance is spent.
#[derive(Debug, PartialEq, Eq)]
enum Pressure {
    /// The first time this window: tell the client it is being slowed.
    Tell,
    /// Already told this window.
    Quiet,
    /// Frames have waited in [`FLOOD_SECONDS`] windows in a row: close.
    Close,
}

impl RateLimit {
    fn new(per_s: u32, now: Instant) -> Self {
        let rate = f64::from(per_s.max(1));
        RateLimit {
            per_s: rate,
            burst: rate * 2.0,
            tokens: rate * 2.0,
            refilled: now,
            epoch: now,
            pressed_window: None,
            pressed_run: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.per_s;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.refilled = now;
    }

    /// When the next frame may be read: `None` if now.
    fn wait(&mut self, now: Instant) -> Option<Instant> {
        self.refill(now);
        (self.tokens < 1.0).then(|| now + Duration::from_secs_f64((1.0 - self.tokens) / self.per_s))
    }

    /// A frame was read: it takes a token.
    fn take(&mut self) {
        self.tokens -= 1.0;
    }

    /// Whether the allowance is spent at `now`.
    fn spent(&mut self, now: Instant) -> bool {
        self.wait(now).is_some()
    }

    /// A frame is waiting while the allowance is spent.
    fn pressed(&mut self, now: Instant) -> Pressure {
        let window = (now.duration_since(self.epoch).as_millis() / RATE_WINDOW.as_millis()) as u64;
        match self.pressed_window {
            Some(w) if w == window => return Pressure::Quiet,
            Some(w) if w + 1 == window => self.pressed_run += 1,
            _ => self.pressed_run = 1,
        }
        self.pressed_window = Some(window);
        if self.pressed_run >= FLOOD_SECONDS {
            Pressure::Close
        } else {
            Pressure::Tell
        }
    }
}

/// Every close code the engine sends (docs/protocol.md lists each, and a
/// test holds the two lists equal): going away, protocol error, invalid
/// data, policy, too big, try again later.
pub const CLOSE_CODES: [u16; 6] = [1001, 1002, 1007, 1008, 1009, 1013];

/// How a session ended, and what the client is told.
pub(crate) fn close_frame(code: CloseCode, reason: &'static str) -> Option<CloseFrame> {
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
pub(crate) async fn sleep_until_some(deadline: Option<Instant>) {
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
    // A frame read ahead to learn whether the client is pressing; it is
    // handled once its token is there.
    let mut held: Option<Result<Message, WsError>> = None;
    let close = loop {
        let resume_at = rate.wait(Instant::now());
        let incoming = match (resume_at, held.take()) {
            (None, Some(frame)) => Some(frame),
            (_, frame) => {
                held = frame;
                tokio::select! {
                    incoming = ws.next(), if resume_at.is_none() => incoming,
                    _ = sleep_until_some(resume_at), if resume_at.is_some() => continue,
                    message = outbox.queue.recv() => match message {
                        Some(message) => {
                            if within(write_timeout, write_batch(&mut ws, message, &mut outbox.queue)).await.is_err() {
                                break Closing::Dropped;
                            }
                            continue;
                        }
                        // Every sender is gone: the driver's actor let go of
                        // this connection (a newer one replaced it, or this
                        // one stopped reading). It gets nothing more.
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
                        continue;
                    }
                    _ = &mut token_expiry => {
                        break Closing::Engine(close_frame(CloseCode::Policy, "token expired: reconnect with a fresh one"));
                    }
                    _ = shutdown.changed() => break Closing::Engine(close_frame(CloseCode::Away, "server shutting down")),
                }
            }
        };
        // Every frame the client sends costs the engine work, so every kind
        // counts against the allowance, pings included.
        rate.take();
        last_heard = Instant::now();
        if let Err(closing) = on_frame(incoming, &mut ws, &mut peer, write_timeout).await {
            break closing;
        }
        // Spent, with the next frame already there: the client sends faster
        // than it may. Hold that frame until its token (a close, an error or
        // the end of the stream is not held: it ends the session now).
        let now = Instant::now();
        if rate.spent(now) {
            match ws.next().now_or_never() {
                None => {}
                Some(Some(Ok(frame))) if !frame.is_close() => {
                    held = Some(Ok(frame));
                    m::frame_delayed();
                    match rate.pressed(now) {
                        Pressure::Quiet => {}
                        Pressure::Tell => {
                            let notice = ServerMessage::error(
                                ErrorCode::RateLimited,
                                format!("at most {per_s} messages per second; frames past it wait their turn (this notice comes once a second)"),
                            );
                            if write_error(&mut ws, notice, write_timeout).await.is_err() {
                                break Closing::Dropped;
                            }
                        }
                        Pressure::Close => {
                            m::flood_closed();
                            break Closing::Engine(close_frame(
                                CloseCode::Policy,
                                "flooding: too many frames for too long",
                            ));
                        }
                    }
                }
                Some(ending) => {
                    if let Err(closing) = on_frame(ending, &mut ws, &mut peer, write_timeout).await
                    {
                        break closing;
                    }
                }
            }
        }
    };
    // Let go of the driver or the searches first: the engine must stop
    // counting on this client at once, not after a slow close handshake.
    peer.closed();
    m::connection_closed(P::ROLE);
    finish(ws, close).await;
}

/// Ends a session's socket as `close` says.
pub(crate) async fn finish(mut ws: Socket, close: Closing) {
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
        // it. Bounded by CLOSE_TIMEOUT and CLOSE_DRAIN_FRAMES, so a client
        // that keeps sending costs no more than that.
        Closing::Engine(frame) => {
            let handshake = async {
                if ws.close(frame).await.is_ok() {
                    let mut read = 0;
                    while let Some(Ok(_)) = ws.next().await {
                        read += 1;
                        if read == CLOSE_DRAIN_FRAMES {
                            break;
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
        }
        Closing::Dropped => {}
    }
}

/// Handles one read from the socket: a command for the peer, an error for
/// the client, or the end of the session.
async fn on_frame<P: Peer>(
    incoming: Option<Result<Message, WsError>>,
    ws: &mut Socket,
    peer: &mut P,
    write_timeout: Duration,
) -> Result<(), Closing> {
    let reply = match incoming {
        Some(Ok(Message::Close(_))) | None => return Err(Closing::ByPeer),
        Some(Err(e)) => return Err(Closing::after_error(P::ROLE, e)),
        Some(Ok(Message::Text(text))) => {
            m::ws_message_in();
            match P::Command::parse(&text) {
                Ok(command) => peer.deliver(command).err(),
                Err(e) => Some(e.into()),
            }
        }
        Some(Ok(Message::Binary(_))) => Some(ServerMessage::error(
            ErrorCode::BinaryNotSupported,
            "send JSON in text frames",
        )),
        // tungstenite answers pings by itself.
        Some(Ok(_)) => None,
    };
    match reply {
        Some(reply) => write_error(ws, reply, write_timeout)
            .await
            .map_err(|_| Closing::Dropped),
        None => Ok(()),
    }
}

/// Why the session loop ended.
pub(crate) enum Closing {
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
    pub(crate) fn after_error(role: &'static str, e: WsError) -> Closing {
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
pub(crate) async fn within(
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
    fn a_burst_passes_then_frames_wait_their_turn() {
        let start = Instant::now();
        let mut rate = RateLimit::new(10, start);
        // The burst: twice the rate, at once.
        for _ in 0..20 {
            assert_eq!(rate.wait(start), None);
            rate.take();
        }
        // Then one every 100 ms.
        let next = rate.wait(start).expect("spent");
        assert_eq!(next.duration_since(start), Duration::from_millis(100));
        assert_eq!(rate.wait(next), None);
        rate.take();
        assert!(rate.spent(next));
    }

    #[test]
    fn a_client_pressing_is_told_once_a_window_and_closed_after_ten() {
        let start = Instant::now();
        let mut rate = RateLimit::new(10, start);
        let mut now = start;
        for window in 0..FLOOD_SECONDS {
            let first = rate.pressed(now);
            let expected = if window + 1 == FLOOD_SECONDS {
                Pressure::Close
            } else {
                Pressure::Tell
            };
            assert_eq!(first, expected, "window {window}");
            assert_eq!(
                rate.pressed(now + Duration::from_millis(500)),
                Pressure::Quiet
            );
            now += RATE_WINDOW;
        }
    }

    #[test]
    fn a_window_without_pressure_starts_the_count_again() {
        let start = Instant::now();
        let mut rate = RateLimit::new(10, start);
        let mut now = start;
        // Pressing nine windows in every ten, forever: never closed.
        for _ in 0..10 {
            for _ in 0..FLOOD_SECONDS - 1 {
                assert_eq!(rate.pressed(now), Pressure::Tell);
                now += RATE_WINDOW;
            }
            now += RATE_WINDOW; // a window of calm
        }
    }
}
