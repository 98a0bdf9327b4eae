//! The listening sockets: one port for the WebSocket API, `/metrics` and
//! `/healthz`, and optionally a private one for `/metrics` and `/healthz`.
//!
//! HTTP is hyper's (HTTP/1.0 and 1.1, size and time limits, 431 and 400 for
//! broken heads); the upgrade to a WebSocket is checked here in order: the
//! total connection cap, the `Origin`, who the client is
//! ([`auth::authenticate`], the one place that decides it), and the
//! WebSocket handshake itself. Then the upgraded socket goes to a
//! [`session`](crate::session).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use actix::Addr;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::http::{Method, Request, Response, StatusCode};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::handshake::server::create_response;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_tungstenite::WebSocketStream;

use crate::actors::driver::DriverRegistry;
use crate::actors::matcher::{Admission, Matcher};
use crate::auth::{self, AuthError, Identity, Role, Verifier};
use crate::config::Config;
use crate::connections::{ConnectionLimits, HandshakeGuard, SessionGuard};
use crate::ids::Ids;
use crate::metrics as m;
use crate::peers;
use crate::session;

/// Largest HTTP request head accepted (hyper's smallest buffer); larger heads
/// get 431.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// What every connection needs from the engine.
pub struct Shared {
    /// Ride requests queued for the matcher.
    pub admission: Arc<Admission>,
    /// The engine's configuration.
    pub config: Arc<Config>,
    /// Driver actors by id.
    pub registry: Arc<DriverRegistry>,
    /// The matcher.
    pub matcher: Addr<Matcher>,
    /// Id counters.
    pub ids: Arc<Ids>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Verifies client tokens; `None` in open mode.
    pub verifier: Option<Verifier>,
    /// Connection caps.
    pub connections: Arc<ConnectionLimits>,
    /// The ops map's board and watchers.
    pub ops: Arc<crate::ops::OpsFeed>,
}

/// Which paths a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routes {
    /// The public port: WebSockets, `/healthz`, and `/metrics` unless it has
    /// its own address.
    Public,
    /// The private metrics port: `/metrics` and `/healthz` only, no token.
    Metrics,
}

/// Accepts connections until `shutdown` turns true. Each connection task holds
/// a clone of `drain`; the caller knows every connection has finished when the
/// receiving end reports all clones dropped.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    routes: Routes,
    mut shutdown: watch::Receiver<bool>,
    drain: mpsc::Sender<()>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => break,
        };
        match accepted {
            Ok((stream, peer_addr)) => {
                let Some(address_guard) = shared.connections.admit_socket(peer_addr.ip()) else {
                    m::connection_refused("address_limit");
                    refuse_at_once(stream, TOO_MANY_FROM_ADDRESS);
                    continue;
                };
                let Some(handshake_guard) = shared.connections.admit_handshake() else {
                    m::connection_refused("handshake_limit");
                    refuse_at_once(stream, TOO_MANY_HANDSHAKES);
                    continue;
                };
                let (shared, shutdown, drain) = (shared.clone(), shutdown.clone(), drain.clone());
                // Offers and answers are small and latency-bound.
                stream.set_nodelay(true).ok();
                tokio::spawn(async move {
                    if let Err(e) =
                        handle(stream, &shared, routes, Some(handshake_guard), shutdown).await
                    {
                        tracing::debug!(%peer_addr, "connection ended: {e}");
                    }
                    drop(address_guard);
                    drop(drain);
                });
            }
            Err(e) => {
                // Out of file descriptors, typically: back off instead of
                // spinning, and keep serving the connections already open.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

const TOO_MANY_FROM_ADDRESS: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 39\r\nConnection: close\r\n\r\ntoo many connections from your address\n";
const TOO_MANY_HANDSHAKES: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 50\r\nConnection: close\r\n\r\ntoo many connections opening at once; retry shortly\n";

/// Longest a refused socket is kept to read (and discard) what its client
/// sent, so that closing it does not reset the connection before the client
/// has read the refusal.
const REFUSAL_LINGER: Duration = Duration::from_millis(200);

/// Answers a socket without reading its request, the point being to spend
/// nothing more on it: the refusal, then a short, bounded drain of what the
/// client already sent (closing with unread input would reset the
/// connection and could destroy the refusal in flight).
fn refuse_at_once(mut stream: TcpStream, refusal: &'static [u8]) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            stream.write_all(refusal).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 1024];
            let mut left = MAX_HEAD_BYTES;
            while left > 0 {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => left = left.saturating_sub(n),
                }
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
    });
}

/// A WebSocket upgrade the HTTP exchange agreed to, picked up once hyper
/// hands the socket over.
struct Upgrade {
    on_upgrade: hyper::upgrade::OnUpgrade,
    identity: Identity,
    expires_at: Option<u64>,
    guard: SessionGuard,
}

/// How serving a connection failed (logged at debug: clients fail all the
/// time, and nothing is to be done about it here).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// hyper refused the request or the socket failed.
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    /// The request was not completed in time.
    #[error("request not completed within the handshake timeout")]
    Timeout,
}

/// Serves one connection: its HTTP request, and the WebSocket session if it
/// upgrades. Any byte stream will do (a TCP socket in the engine, an
/// in-memory pipe in the fuzzer).
///
/// `handshake` is the socket's place among those in their handshake, given
/// back as soon as the HTTP exchange is over.
pub async fn handle<S>(
    stream: S,
    shared: &Arc<Shared>,
    routes: Routes,
    handshake: Option<HandshakeGuard>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnectionError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let upgrade: Arc<Mutex<Option<Upgrade>>> = Arc::default();
    let service = {
        let (shared, upgrade) = (shared.clone(), upgrade.clone());
        service_fn(move |request| {
            let response = route(request, &shared, routes, &upgrade);
            async move { Ok::<_, Infallible>(response) }
        })
    };
    // One request per connection: a WebSocket upgrade, a health check or a
    // scrape (every plain response says `Connection: close`; hyper's own
    // keep-alive switch would also overwrite the upgrade's `Connection`
    // header). The whole exchange has the handshake timeout, so a silent or
    // slow socket costs a file descriptor for that long at most.
    let connection = http1::Builder::new()
        .max_buf_size(MAX_HEAD_BYTES)
        // A client that shuts down its sending side after the request (as
        // `nc -N` and some health checkers do) still gets its answer
        // (found by the handshake fuzzer).
        .half_close(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let exchanged = tokio::time::timeout(shared.config.handshake_timeout(), connection).await;
    drop(handshake);
    exchanged.map_err(|_| ConnectionError::Timeout)??;
    let pending = upgrade.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(pending) = pending {
        let upgraded = pending.on_upgrade.await?;
        let config = match pending.identity {
            Identity::Ops(_) => crate::ops::session::websocket_config(),
            _ => session::websocket_config(shared.config.max_message_bytes),
        };
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), WsRole::Server, Some(config))
                .await;
        let expires = pending
            .expires_at
            .map(|exp| token_deadline(exp, shared.config.token_leeway_s));
        peers::run_session(ws, pending.identity, expires, shared, shutdown).await;
        drop(pending.guard);
    }
    Ok(())
}

/// When a connection whose token expires at `exp` (Unix seconds) is closed:
/// `exp` plus the leeway, on the monotonic clock. Far-future expiries (a
/// token minted for a century) are clamped rather than overflowing.
fn token_deadline(exp: u64, leeway_s: u64) -> tokio::time::Instant {
    /// Longer than any connection lives; beyond it an expiry is "never".
    const FAR: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
    let left = exp
        .saturating_add(leeway_s)
        .saturating_sub(auth::unix_now());
    let now = tokio::time::Instant::now();
    now.checked_add(Duration::from_secs(left).min(FAR))
        .unwrap_or(now + FAR)
}

type Body = Full<Bytes>;

/// Answers one HTTP request; a WebSocket upgrade it agrees to is left in
/// `upgrade` for [`handle`].
fn route(
    request: Request<Incoming>,
    shared: &Shared,
    routes: Routes,
    upgrade: &Mutex<Option<Upgrade>>,
) -> Response<Body> {
    let mut response = respond(request, shared, routes, upgrade);
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn respond(
    mut request: Request<Incoming>,
    shared: &Shared,
    routes: Routes,
    upgrade: &Mutex<Option<Upgrade>>,
) -> Response<Body> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served");
    }
    let path = request.uri().path().to_string();
    match (routes, path.as_str()) {
        (_, "/healthz") => text(StatusCode::OK, "ok"),
        (Routes::Metrics, "/metrics") => metrics(shared),
        (Routes::Public, "/metrics") => match public_metrics_access(&request, shared) {
            Ok(()) => metrics(shared),
            Err(refusal) => refusal.into_response(),
        },
        (Routes::Public, _) => match auth::endpoint_role(&path) {
            Some(role) => match agree_to_upgrade(&mut request, role, shared) {
                Ok((response, pending)) => {
                    *upgrade.lock().unwrap_or_else(|e| e.into_inner()) = Some(pending);
                    response
                }
                Err(refusal) => refusal.into_response(),
            },
            // The pages and their assets, embedded in the binary.
            None => match crate::web::page(&path, header_str(&request, header::IF_NONE_MATCH)) {
                Some(page) => page.map(|bytes| Body::new(Bytes::from(bytes))),
                None => text(StatusCode::NOT_FOUND, "no such endpoint"),
            },
        },
        (Routes::Metrics, _) => text(
            StatusCode::NOT_FOUND,
            "this port serves /metrics and /healthz",
        ),
    }
}

/// `/metrics` on the public port: open in open mode; with a secret, moved to
/// `--metrics-listen` if that is set, else for `ops` tokens only.
fn public_metrics_access(request: &Request<Incoming>, shared: &Shared) -> Result<(), Refusal> {
    let Some(verifier) = &shared.verifier else {
        return Ok(());
    };
    if shared.config.metrics_listen.is_some() {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "/metrics is served on the metrics address",
        ));
    }
    let authorization = header_str(request, header::AUTHORIZATION);
    auth::bearer_token(authorization, request.uri().query())
        .ok_or(AuthError::Missing)
        .and_then(|token| verifier.verify(&token, Role::Ops))
        .map(|_| ())
        .map_err(Refusal::unauthorized)
}

fn metrics(shared: &Shared) -> Response<Body> {
    let mut response = Response::new(Body::from(shared.metrics.render()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// Checks a WebSocket upgrade request; the 101 response and what the session
/// needs, or the refusal to send instead.
fn agree_to_upgrade(
    request: &mut Request<Incoming>,
    role: Role,
    shared: &Shared,
) -> Result<(Response<Body>, Upgrade), Refusal> {
    if let Err(why) = check_origin(request, &shared.config.allowed_origins) {
        m::connection_refused("origin");
        return Err(Refusal::new(StatusCode::FORBIDDEN, why));
    }
    if shared.verifier.is_none() && !shared.config.insecure_open && is_forwarded(request) {
        // Open mode bound to loopback behind a reverse proxy would serve the
        // internet unverified: refuse what a proxy forwarded.
        m::connection_refused("origin");
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "open mode serves local clients only: this request came through a proxy (set --auth-secret-file, or --insecure-open)",
        ));
    }
    // Who the client is comes before the connection cap: an unauthenticated
    // client learns nothing about the engine's load, and a burst of bad
    // tokens never takes an honest client's place for a moment.
    let authorization = match request.headers().get(header::AUTHORIZATION) {
        Some(value) => Some(value.to_str().map_err(|_| {
            Refusal::unauthorized(AuthError::Invalid(
                "the Authorization header is not ASCII".into(),
            ))
        })?),
        None => None,
    };
    let verified = auth::authenticate(
        shared.verifier.as_ref(),
        role,
        authorization,
        request.uri().query(),
    )
    .map_err(|e| match e {
        // Only open mode refuses an `id` (a token's bad `sub` is an invalid
        // token): a bad request, not a failed login.
        AuthError::BadId(why) => Refusal::new(StatusCode::BAD_REQUEST, why),
        e => Refusal::unauthorized(e),
    })?;
    let Some(guard) = shared.connections.admit_session() else {
        m::connection_refused("connection_limit");
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the engine holds its limit of {} connections; retry shortly",
                shared.connections.max_sessions()
            ),
        ));
    };
    // tungstenite checks the handshake (GET, HTTP/1.1, Upgrade, Connection,
    // version 13, key) and computes the accept key.
    let handshake = {
        let mut head = Request::new(());
        *head.method_mut() = request.method().clone();
        *head.uri_mut() = request.uri().clone();
        *head.version_mut() = request.version();
        *head.headers_mut() = request.headers().clone();
        head
    };
    let response = create_response(&handshake).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("not a WebSocket handshake: {e}"),
        )
    })?;
    let pending = Upgrade {
        on_upgrade: hyper::upgrade::on(request),
        identity: verified.identity,
        expires_at: verified.expires_at,
        guard,
    };
    Ok((response.map(|()| Body::default()), pending))
}

/// Whether a reverse proxy forwarded the request (it says so in a header).
fn is_forwarded<B>(request: &Request<B>) -> bool {
    ["forwarded", "x-forwarded-for", "x-real-ip"]
        .iter()
        .any(|name| request.headers().contains_key(*name))
}

/// A browser's `Origin` must be the engine's own or an allowed one; a request
/// with no `Origin` is not from a browser page and is not affected. This is
/// what stops a page on another site from opening a WebSocket with the
/// user's cookies or a token it found (cross-site WebSocket hijacking).
fn check_origin(request: &Request<Incoming>, allowed: &[String]) -> Result<(), String> {
    let Some(origin) = request.headers().get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    let same_origin = header_str(request, header::HOST).is_some_and(|host| {
        origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host))
    });
    if same_origin || allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
        Ok(())
    } else {
        Err(format!(
            "origin {origin} may not open WebSockets here (see --allowed-origin)"
        ))
    }
}

fn header_str<B>(request: &Request<B>, name: header::HeaderName) -> Option<&str> {
    request.headers().get(name).and_then(|v| v.to_str().ok())
}

/// A request refused: its status and one-line reason.
struct Refusal {
    status: StatusCode,
    reason: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            reason: reason.into(),
        }
    }

    fn unauthorized(e: AuthError) -> Self {
        m::connection_refused("unauthorized");
        Refusal::new(StatusCode::UNAUTHORIZED, e.to_string())
    }

    fn into_response(self) -> Response<Body> {
        let mut response = text(self.status, &self.reason);
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ridelock\""),
            );
        }
        response
    }
}

/// A plain-text response: one line and a newline.
fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(Body::from(format!("{body}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Binds a listener (separate so callers can learn the port first).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
