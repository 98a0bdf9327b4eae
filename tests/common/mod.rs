//! Test harness: a real engine on an ephemeral port and real WebSocket clients.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod redis;
pub mod scenario;

use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ridelock::auth::{self, Role};
use ridelock::matcher::MatcherStats;
use ridelock::protocol::ServerMessage;
use ridelock::{Config, Engine};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for a message it expects.
pub const EXPECT_WITHIN: Duration = Duration::from_secs(5);

/// The file with the secret every test engine verifies tokens with.
pub fn secret_file() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/auth-secret"
    ))
}

/// The test secret itself (the file's bytes, trimmed, as the engine reads it).
pub fn secret() -> Vec<u8> {
    auth::read_secret(&secret_file()).expect("the test secret is readable")
}

/// A token for `id` in `role`, valid for an hour.
pub fn token(role: Role, id: &str) -> String {
    auth::mint(&secret(), role, id, Duration::from_secs(3600))
}

/// A config for tests: ephemeral port, tokens verified with the test
/// secret and no leeway, greedy dispatch, everything else default unless
/// changed. Greedy, not the default batch: these tests are about locks,
/// offers and who gets which driver, and want each request's first offer
/// at once rather than after a window and its waits; batching is tested
/// in `tests/dispatch.rs`, `tests/reach.rs` and the fault simulation.
pub fn config(adjust: impl FnOnce(&mut Config)) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        auth_secret_file: Some(secret_file()),
        token_leeway_s: 0,
        dispatch: ridelock::config::DispatchMode::Greedy,
        ..Config::default()
    };
    adjust(&mut config);
    config
}

/// Starts an engine with `adjust` applied to the test config.
pub async fn engine(adjust: impl FnOnce(&mut Config)) -> Engine {
    // `RIDELOCK_TEST_LOG=debug cargo test …` shows the engines' logs.
    if let Ok(filter) = std::env::var("RIDELOCK_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    Engine::start(config(adjust)).await.expect("engine starts")
}

/// Waits until the matcher's counts satisfy `done` (they change as actor
/// messages are handled, which no client message announces).
pub async fn wait_for_stats(engine: &Engine, what: &str, done: impl Fn(&MatcherStats) -> bool) {
    let deadline = tokio::time::Instant::now() + EXPECT_WITHIN;
    loop {
        let stats = engine.stats().await;
        if done(&stats) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {what}, matcher has {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the matcher's index holds `n` available drivers.
pub async fn wait_for_available(engine: &Engine, n: usize) {
    wait_for_stats(engine, &format!("{n} available drivers"), |s| {
        s.available_drivers == n
    })
    .await;
}

/// Waits until `n` searches are parked waiting for a driver.
pub async fn wait_for_waiting(engine: &Engine, n: usize) {
    wait_for_stats(engine, &format!("{n} waiting searches"), |s| s.waiting == n).await;
}

/// `GET path` over a fresh TCP connection; the whole response.
pub async fn http_get(addr: impl tokio::net::ToSocketAddrs, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// Sends `request` (a whole raw HTTP request) over a fresh TCP connection;
/// the whole response.
pub async fn http_raw(addr: impl tokio::net::ToSocketAddrs, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    String::from_utf8_lossy(&response).into_owned()
}

/// The status a refused upgrade to `path` with `token` as its Bearer got
/// (`None` if it upgraded).
pub async fn refused_status(addr: impl std::fmt::Display, path: &str, token: &str) -> Option<u16> {
    let bearer = format!("Bearer {token}");
    try_upgrade(addr, path, &[("Authorization", &bearer)])
        .await
        .err()
        .map(|(status, _)| status)
}

/// Tries a WebSocket upgrade to `path` with extra `headers`; the client, or
/// the refusal's status and body.
pub async fn try_upgrade(
    addr: impl std::fmt::Display,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Client, (u16, String)> {
    use tokio_tungstenite::tungstenite::Error;
    let mut request = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("a valid URL");
    for (name, value) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(Client {
            ws,
            id: path.to_string(),
        }),
        Err(Error::Http(response)) => {
            let body = response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((response.status().as_u16(), body))
        }
        Err(e) => panic!("{path}: neither upgraded nor refused: {e}"),
    }
}

/// Starts the `ridelock` binary with the test secret and `args` (add
/// `--listen 127.0.0.1:0` for an ephemeral port); returns it and the address
/// it logged. Its log is
/// drained on a thread so it never blocks on a full pipe.
pub fn spawn_engine(args: &[&str]) -> (EngineProcess, String) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let secret = secret_file();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ridelock"))
        .arg("--auth-secret-file")
        .arg(&secret)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RIDELOCK_TEST_CHILD_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("NO_COLOR", "1")
        // Greedy, as in `config` (an explicit `--dispatch` wins).
        .env("RIDELOCK_DISPATCH", "greedy")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("ridelock starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let Some(line) = lines.next() else {
            let status = child.wait().expect("the engine exits");
            panic!("the engine exited ({status}) before logging its address");
        };
        let line = line.expect("readable log");
        if let Some(rest) = line.split("local_addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let addr_for_log = addr.clone();
    // RIDELOCK_TEST_LOG=1 shows the process's log on the test's stderr.
    let echo = std::env::var_os("RIDELOCK_TEST_LOG").is_some();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if echo {
                eprintln!("[{addr_for_log}] {line}");
            }
        }
    });
    (EngineProcess(child), addr)
}

/// A `ridelock` process, killed when dropped (a failing test must not leave
/// it running, or paused).
pub struct EngineProcess(pub std::process::Child);

impl std::ops::Deref for EngineProcess {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for EngineProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return; // exited and reaped: its pid may be someone else's now
        }
        // SAFETY: kill(2) on our own, unreaped child's pid; SIGCONT first so
        // that a paused process can die.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGCONT);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A WebSocket client speaking the engine's protocol.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub id: String,
}

impl Client {
    /// Connects as `id` in `role` ("driver" or "rider") with a token for it
    /// in the `Authorization` header.
    pub async fn connect(addr: impl std::fmt::Display, role: &str, id: &str) -> Client {
        let token = token(role.parse().expect("a role"), id);
        Client::connect_with(addr, role, "", Some(&token), id).await
    }

    /// Connects to an open-mode engine, the id in the URL.
    pub async fn connect_open(addr: impl std::fmt::Display, role: &str, id: &str) -> Client {
        Client::connect_with(addr, role, &format!("?id={id}"), None, id).await
    }

    /// Connects to `/ws/{role}{query}`, with `bearer` in the `Authorization`
    /// header if given; `id` names the client in failures.
    pub async fn connect_with(
        addr: impl std::fmt::Display,
        role: &str,
        query: &str,
        bearer: Option<&str>,
        id: &str,
    ) -> Client {
        let mut request = format!("ws://{addr}/ws/{role}{query}")
            .into_client_request()
            .expect("a valid URL");
        if let Some(token) = bearer {
            request.headers_mut().insert(
                "Authorization",
                format!("Bearer {token}").parse().expect("a header value"),
            );
        }
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .unwrap_or_else(|e| panic!("{id}: connects: {e}"));
        Client {
            ws,
            id: id.to_string(),
        }
    }

    pub async fn driver(engine: &Engine, id: &str) -> Client {
        Client::connect(engine.local_addr(), "driver", id).await
    }

    pub async fn rider(engine: &Engine, id: &str) -> Client {
        Client::connect(engine.local_addr(), "rider", id).await
    }

    /// A driver at (lat, lon) that said `available`.
    pub async fn available_driver(engine: &Engine, id: &str, lat: f64, lon: f64) -> Client {
        let mut driver = Client::driver(engine, id).await;
        driver.go_available(lat, lon).await;
        driver
    }

    /// Sends the driver's position, then `available`.
    pub async fn go_available(&mut self, lat: f64, lon: f64) {
        self.send(json!({"type": "location", "lat": lat, "lon": lon}))
            .await;
        self.send(json!({"type": "available"})).await;
    }

    /// Closes from the client's side with 1000 (normal).
    pub async fn close_normally(&mut self) {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        self.ws
            .close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await
            .expect("the close frame goes out");
    }

    pub async fn send(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("sends");
    }

    /// The next protocol message, within [`EXPECT_WITHIN`].
    pub async fn recv(&mut self) -> ServerMessage {
        self.recv_within(EXPECT_WITHIN)
            .await
            .unwrap_or_else(|| panic!("{}: no message within {EXPECT_WITHIN:?}", self.id))
    }

    /// The next protocol message, or `None` if none comes within `wait`.
    pub async fn recv_within(&mut self, wait: Duration) -> Option<ServerMessage> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match frame {
                Some(Ok(Message::Text(text))) => {
                    return Some(serde_json::from_str(&text).unwrap_or_else(|e| {
                        panic!("{}: engine sent unparsable {text}: {e}", self.id)
                    }))
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("{}: expected a text frame, got {other:?}", self.id),
            }
        }
    }

    /// Asserts nothing arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Some(message) = self.recv_within(wait).await {
            panic!("{}: expected silence, got {message:?}", self.id);
        }
    }

    /// The next message, which must be an offer; returns (offer_id, request_id).
    pub async fn expect_offer(&mut self) -> (u64, String) {
        match self.recv().await {
            ServerMessage::Offer {
                offer_id,
                request_id,
                ..
            } => (offer_id, request_id.to_string()),
            other => panic!("{}: expected an offer, got {other:?}", self.id),
        }
    }

    /// Like [`expect_offer`](Self::expect_offer), waiting up to `wait` (news
    /// that crosses nodes through Redis can take a few seconds on a loaded
    /// machine: a node subscribing late, a lost message settled after 2 s).
    pub async fn expect_offer_within(&mut self, wait: Duration) -> (u64, String) {
        match self.recv_within(wait).await {
            Some(ServerMessage::Offer {
                offer_id,
                request_id,
                ..
            }) => (offer_id, request_id.to_string()),
            other => panic!(
                "{}: expected an offer within {wait:?}, got {other:?}",
                self.id
            ),
        }
    }

    /// The next message, which must be an error; returns its code.
    pub async fn expect_error(&mut self) -> String {
        match self.recv().await {
            ServerMessage::Error { code, .. } => code.as_str().to_string(),
            other => panic!("{}: expected an error, got {other:?}", self.id),
        }
    }

    /// Answers an offer.
    pub async fn accept(&mut self, offer_id: u64) {
        self.send(json!({"type": "accept", "offer_id": offer_id}))
            .await;
    }

    /// Turns an offer down.
    pub async fn decline(&mut self, offer_id: u64) {
        self.send(json!({"type": "decline", "offer_id": offer_id}))
            .await;
    }

    /// The next message, which must be `matched`; returns the driver's id.
    pub async fn expect_matched(&mut self) -> String {
        match self.recv().await {
            ServerMessage::Matched { driver_id, .. } => driver_id.to_string(),
            other => panic!("{}: expected matched, got {other:?}", self.id),
        }
    }

    pub async fn request_ride(&mut self, request_id: &str, lat: f64, lon: f64) {
        self.send(json!({
            "type": "request_ride",
            "request_id": request_id,
            "pickup": {"lat": lat, "lon": lon},
        }))
        .await;
    }

    /// Expects `searching` for `request_id`.
    pub async fn expect_searching(&mut self, request_id: &str) {
        match self.recv().await {
            ServerMessage::Searching { request_id: r } if &*r == request_id => {}
            other => panic!(
                "{}: expected searching for {request_id}, got {other:?}",
                self.id
            ),
        }
    }

    /// Reads (and skips) whatever comes until the engine closes the
    /// connection, within `wait`; the close code, if a close frame came.
    pub async fn closed_within(&mut self, wait: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("{}: not closed within {wait:?}", self.id),
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code.into()),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_)) | None) => return None,
            }
        }
    }

    /// Waits for the connection to be closed by the engine; returns the close code.
    pub async fn expect_closed(&mut self) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + EXPECT_WITHIN;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("{}: connection not closed in time", self.id),
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code.into()),
                Ok(Some(Ok(Message::Text(t)))) => panic!("{}: expected close, got {t}", self.id),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_)) | None) => return None,
            }
        }
    }
}
