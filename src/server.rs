//! The listening socket: one port for the WebSocket API, `/metrics` and
//! `/healthz`.
//!
//! Each connection's request head is parsed with tungstenite's own HTTP parser
//! (httparse underneath) and routed by path. WebSocket paths go through
//! [`authenticate`], the single place that decides who a connection is, then
//! through tungstenite's handshake, then to a [`session`](crate::session).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::handshake::machine::TryParse;
use tokio_tungstenite::tungstenite::handshake::server::{create_response, write_response, Request};
use tokio_tungstenite::tungstenite::http::{Response, StatusCode};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::config::Config;
use crate::driver::{Detach, DriverActor, DriverRegistry, FromDriver};
use crate::ids::Ids;
use crate::matcher::{Admission, CancelRide, Matcher, RequestRide, RiderGone, RiderLink};
use crate::protocol::{DriverCommand, ErrorCode, RiderCommand, ServerMessage};
use crate::session::{self, Outbox, Peer};

/// Largest HTTP request head accepted.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest driver or rider id accepted.
const MAX_ID_LEN: usize = 64;

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
}

/// Accepts connections until `shutdown` turns true. Each connection task holds
/// a clone of `drain`; the caller knows every connection has finished when the
/// receiving end reports all clones dropped.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
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
                let (shared, shutdown, drain) = (shared.clone(), shutdown.clone(), drain.clone());
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &shared, shutdown).await {
                        tracing::debug!(%peer_addr, "connection refused: {e}");
                    }
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

/// Who a WebSocket connection speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A driver app.
    Driver(Arc<str>),
    /// A rider app.
    Rider(Arc<str>),
}

/// Decides who a connection is from its request. Today the `id` query
/// parameter is taken at its word; token authentication belongs here.
pub fn authenticate(request: &Request) -> Result<Identity, (StatusCode, String)> {
    let uri = request.uri();
    let role: fn(Arc<str>) -> Identity = match uri.path() {
        "/ws/driver" => Identity::Driver,
        "/ws/rider" => Identity::Rider,
        _ => return Err((StatusCode::NOT_FOUND, "no such endpoint".into())),
    };
    let id = uri
        .query()
        .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "id"))
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("an id query parameter of 1 to {MAX_ID_LEN} bytes is required"),
        ));
    }
    Ok(role(id.into()))
}

#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("request head not received in time")]
    HeadTimeout,
    #[error("bad request: {0}")]
    BadRequest(String),
}

async fn handle(
    stream: TcpStream,
    shared: &Shared,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    // The handshake's request, response and buffers are dropped before the
    // session starts: a connection lives for hours and keeps only what it uses.
    let Some((ws, identity)) = handshake(stream, shared).await? else {
        return Ok(());
    };
    let (outbox, inbox) = Outbox::new();
    let rate = shared.config.max_messages_per_s;
    match identity {
        Identity::Driver(driver_id) => {
            let session = shared.ids.next_session();
            let driver = shared.registry.attach(driver_id, session, outbox).await;
            session::run(ws, DriverPeer { driver, session }, inbox, rate, shutdown).await;
        }
        Identity::Rider(rider_id) => {
            let rider = RiderLink {
                rider_id,
                session: shared.ids.next_session(),
                outbox,
            };
            let peer = RiderPeer {
                matcher: shared.matcher.clone(),
                admission: shared.admission.clone(),
                rider,
            };
            session::run(ws, peer, inbox, rate, shutdown).await;
        }
    }
    Ok(())
}

/// Reads the request head and either answers it as plain HTTP (`None`) or
/// completes the WebSocket handshake for a known identity.
async fn handshake(
    mut stream: TcpStream,
    shared: &Shared,
) -> Result<Option<(WebSocketStream<TcpStream>, Identity)>, ConnectionError> {
    // Offers and answers are small and latency-bound.
    stream.set_nodelay(true)?;
    let (request, leftover) = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await
    {
        Ok(Ok(parsed)) => parsed,
        Ok(Err(HeadError::Io(e))) => return Err(e.into()),
        Ok(Err(HeadError::Invalid(status, why))) => {
            respond(&mut stream, status, &why).await?;
            return Err(ConnectionError::BadRequest(why));
        }
        Err(_) => return Err(ConnectionError::HeadTimeout),
    };
    match request.uri().path() {
        "/metrics" => {
            let body = shared.metrics.render();
            respond_with(
                &mut stream,
                StatusCode::OK,
                "text/plain; version=0.0.4",
                &body,
            )
            .await?;
            return Ok(None);
        }
        "/healthz" => {
            respond(&mut stream, StatusCode::OK, "ok").await?;
            return Ok(None);
        }
        _ => {}
    }
    let identity = match authenticate(&request) {
        Ok(identity) => identity,
        Err((status, why)) => {
            respond(&mut stream, status, &why).await?;
            return Err(ConnectionError::BadRequest(why));
        }
    };
    let response = match create_response(&request) {
        Ok(response) => response,
        Err(e) => {
            let why = format!("not a WebSocket handshake: {e}");
            respond(&mut stream, StatusCode::BAD_REQUEST, &why).await?;
            return Err(ConnectionError::BadRequest(why));
        }
    };
    let mut head = Vec::with_capacity(256);
    write_response(&mut head, &response).map_err(|e| ConnectionError::BadRequest(e.to_string()))?;
    stream.write_all(&head).await?;
    let config = session::websocket_config(shared.config.max_message_bytes);
    let ws =
        WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(config)).await;
    Ok(Some((ws, identity)))
}

enum HeadError {
    Io(std::io::Error),
    Invalid(StatusCode, String),
}

/// Reads until a full request head has arrived; returns it and any bytes
/// read past it.
async fn read_head(stream: &mut TcpStream) -> Result<(Request, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(HeadError::Invalid(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request head too large".into(),
            ));
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        match Request::try_parse(&buf) {
            Ok(Some((size, request))) => return Ok((request, buf.split_off(size))),
            Ok(None) => continue,
            Err(e) => {
                let status = match e {
                    tokio_tungstenite::tungstenite::Error::Protocol(
                        tokio_tungstenite::tungstenite::error::ProtocolError::WrongHttpMethod,
                    ) => StatusCode::METHOD_NOT_ALLOWED,
                    _ => StatusCode::BAD_REQUEST,
                };
                return Err(HeadError::Invalid(status, e.to_string()));
            }
        }
    }
}

async fn respond(stream: &mut TcpStream, status: StatusCode, body: &str) -> std::io::Result<()> {
    respond_with(
        stream,
        status,
        "text/plain; charset=utf-8",
        &format!("{body}\n"),
    )
    .await
}

async fn respond_with(
    stream: &mut TcpStream,
    status: StatusCode,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let response = Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .header("Content-Length", body.len())
        .header("Connection", "close")
        .body(())
        .map_err(std::io::Error::other)?;
    let mut out = Vec::with_capacity(body.len() + 128);
    write_response(&mut out, &response).map_err(std::io::Error::other)?;
    out.extend_from_slice(body.as_bytes());
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// A driver connection hands commands to the driver's actor.
struct DriverPeer {
    driver: Addr<DriverActor>,
    session: u64,
}

impl Peer for DriverPeer {
    type Command = DriverCommand;
    const ROLE: &'static str = "driver";

    fn deliver(&mut self, command: DriverCommand) -> Result<(), ServerMessage> {
        self.driver.do_send(FromDriver {
            session: self.session,
            command,
        });
        Ok(())
    }

    fn closed(self) {
        self.driver.do_send(Detach {
            session: self.session,
        });
    }
}

/// A rider connection hands commands to the matcher.
struct RiderPeer {
    matcher: Addr<Matcher>,
    admission: Arc<Admission>,
    rider: RiderLink,
}

impl Peer for RiderPeer {
    type Command = RiderCommand;
    const ROLE: &'static str = "rider";

    fn deliver(&mut self, command: RiderCommand) -> Result<(), ServerMessage> {
        match command {
            RiderCommand::RequestRide { request_id, pickup } => {
                if !self.admission.try_enter() {
                    return Err(ServerMessage::request_error(
                        ErrorCode::Overloaded,
                        request_id,
                        "the engine is behind on ride requests; retry in a moment",
                    ));
                }
                self.matcher.do_send(RequestRide {
                    rider: self.rider.clone(),
                    request_id,
                    pickup,
                    received_at: std::time::Instant::now(),
                });
            }
            // Cancels are never refused: they free drivers.
            RiderCommand::Cancel { request_id } => self.matcher.do_send(CancelRide {
                rider: self.rider.clone(),
                request_id,
            }),
        }
        Ok(())
    }

    fn closed(self) {
        self.matcher.do_send(RiderGone {
            rider_id: self.rider.rider_id,
            session: self.rider.session,
        });
    }
}

/// Binds the listener (separate so callers can learn the port first).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
