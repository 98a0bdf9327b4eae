//! Engine configuration: clap flags, each with an environment-variable
//! fallback, documented field by field.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::auth::Role;
use crate::core::search::Dispatch;

/// The `ridelock` command line: serve (the default), or a tool.
#[derive(Debug, Parser)]
#[command(
    name = "ridelock",
    version,
    about = "Ride-sharing matchmaking engine",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// A tool to run instead of the engine.
    #[command(subcommand)]
    pub tool: Option<Tool>,
    /// The engine's flags.
    #[command(flatten)]
    pub config: Config,
}

/// Tools beside the engine.
#[derive(Debug, Subcommand)]
pub enum Tool {
    /// Print a signed token for a driver, rider or operator (for operators,
    /// scripts and the simulator; apps get theirs from the login service).
    Token(TokenArgs),
}

/// `ridelock token`.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// What the token lets its holder be.
    #[arg(long)]
    pub role: Role,
    /// The driver's or rider's id (the token's `sub`).
    #[arg(long)]
    pub id: String,
    /// How long the token is valid, e.g. `1h`, `15m`, `30s`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// The secret the engine verifies tokens with.
    #[arg(long, env = "RIDELOCK_AUTH_SECRET_FILE")]
    pub auth_secret_file: PathBuf,
}

/// How a ridelock engine runs.
#[derive(Clone, Debug, Parser)]
#[command(name = "ridelock", version, about = "Ride-sharing matchmaking engine")]
pub struct Config {
    /// Address to serve WebSockets, /metrics and /healthz on.
    #[arg(long, env = "RIDELOCK_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// A second address serving only `/metrics` and `/healthz`, unauthenticated,
    /// for a Prometheus on a private network. With it and a secret, the
    /// public port no longer serves `/metrics` at all.
    #[arg(long, env = "RIDELOCK_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// File holding the secret that signs client tokens (HS256 JWTs with
    /// `sub`, `role`, `exp`); its bytes with surrounding whitespace trimmed,
    /// at least 32. Without it the engine runs in open mode: identities are
    /// taken from the `id` query parameter, unverified. See docs/security.md.
    #[arg(long, env = "RIDELOCK_AUTH_SECRET_FILE")]
    pub auth_secret_file: Option<PathBuf>,

    /// Allow open mode (no `--auth-secret-file`) on an address other than
    /// loopback. Anyone who reaches the port can then act as any driver or
    /// rider.
    #[arg(long, env = "RIDELOCK_INSECURE_OPEN")]
    pub insecure_open: bool,

    /// Clock skew allowed between the token issuer and the engine, in seconds:
    /// a token is accepted up to this long after its `exp`, and a connection
    /// whose token expires is closed (1008) this long after `exp`.
    #[arg(long, env = "RIDELOCK_TOKEN_LEEWAY_S", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub token_leeway_s: u64,

    /// Web origins whose pages may open WebSockets here (repeatable, e.g.
    /// `https://rider.example.com`). A browser's `Origin` must be one of
    /// these or the engine's own origin; clients that send no `Origin` (apps)
    /// are not affected. Stops cross-site WebSocket hijacking.
    #[arg(
        long = "allowed-origin",
        env = "RIDELOCK_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// Open WebSocket connections at most, over all clients; past it, upgrades
    /// get HTTP 503 while `/healthz` still answers. 0: the open-file limit
    /// less a reserve for handshakes, health checks and Redis.
    #[arg(long, env = "RIDELOCK_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Sockets still in their handshake (request head, token check,
    /// upgrade) at most, over all clients; past it, new ones get HTTP 503 and
    /// are closed at once. Bounds what silent sockets from many addresses can
    /// hold (each for --handshake-timeout-ms at most).
    #[arg(long, env = "RIDELOCK_MAX_HANDSHAKES", default_value_t = crate::connections::DEFAULT_MAX_HANDSHAKES)]
    pub max_handshakes: usize,

    /// Connections (WebSockets and handshakes) from one client address at
    /// most (an IPv6 client is its /64); past it, new ones get HTTP 429 and
    /// are closed at once. 0: no limit (behind a reverse proxy every client
    /// has the proxy's address: limit per client there). See
    /// docs/security.md.
    #[arg(
        long,
        env = "RIDELOCK_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 1024
    )]
    pub max_connections_per_address: usize,

    /// How long a driver has to answer an offer, in milliseconds. The driver is
    /// locked for the rider this long at most.
    #[arg(long, env = "RIDELOCK_OFFER_TIMEOUT_MS", default_value_t = 15_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub offer_timeout_ms: u64,

    /// How long a request looks for a driver before the rider is told
    /// `no_driver`, in milliseconds. An offer already made when it runs out is
    /// allowed to finish.
    #[arg(long, env = "RIDELOCK_SEARCH_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub search_timeout_ms: u64,

    /// Only drivers within this great-circle distance of the pickup are
    /// offered, in metres (at first: see --radius-step-m).
    #[arg(long, env = "RIDELOCK_RADIUS_M", default_value_t = 5_000.0)]
    pub radius_m: f64,

    /// How new requests get their first driver: `batch` (requests arriving
    /// within --batch-window-ms assigned together by minimum total pickup
    /// distance, waiting for a nearer driver per --batch-wait-m) or
    /// `greedy` (each its nearest free driver on arrival, at once). Batch
    /// is the default: pickups about 10% shorter at 60% of drivers busy and
    /// 30% at 90%, for a second or two more of searching (BENCHMARKS.md,
    /// "Dispatch").
    #[arg(long, env = "RIDELOCK_DISPATCH", value_enum, default_value_t = DispatchMode::Batch)]
    pub dispatch: DispatchMode,

    /// With `--dispatch batch`: how long a request waits for others to be
    /// assigned with, in milliseconds.
    #[arg(long, env = "RIDELOCK_BATCH_WINDOW_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch_window_ms: u64,

    /// With `--dispatch batch`: what waiting one more window costs, in
    /// metres of pickup: a request waits for the next window rather than
    /// take a driver farther than this (drivers free up all the time; one
    /// may come nearer), as the assignment weighs it against the batch's
    /// other requests; at most --batch-max-waits windows. 0 serves every
    /// request it can at once.
    #[arg(long, env = "RIDELOCK_BATCH_WAIT_M", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub batch_wait_m: u32,

    /// With `--dispatch batch` and --batch-wait-m: how many windows a
    /// request may wait for a nearer driver before it takes the best one
    /// it can get.
    #[arg(long, env = "RIDELOCK_BATCH_MAX_WAITS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    pub batch_max_waits: u32,

    /// GeoJSON file of the areas served: a FeatureCollection of Polygons or
    /// MultiPolygons, each with a string `name` property. Requests whose
    /// pickup is outside every area get `outside_service_area`; drivers
    /// outside every area are not offered. Without it, everywhere is served.
    /// Every node of a cluster must be given the same file.
    #[arg(long, env = "RIDELOCK_SERVICE_AREA")]
    pub service_area: Option<PathBuf>,

    /// A driver whose last `location` is older than this, in seconds, is not
    /// offered until its next one, even with its connection open.
    #[arg(long, env = "RIDELOCK_LOCATION_MAX_AGE_S", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub location_max_age_s: u64,

    /// How much farther a request looks for every --radius-step-ms it has
    /// waited, in metres, up to --max-radius-m; 0 keeps --radius-m.
    #[arg(long, env = "RIDELOCK_RADIUS_STEP_M", default_value_t = 1_000.0)]
    pub radius_step_m: f64,

    /// How often a waiting request's search radius grows, in milliseconds.
    #[arg(long, env = "RIDELOCK_RADIUS_STEP_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub radius_step_ms: u64,

    /// How far a waiting request's search radius grows at most, in metres
    /// (at least --radius-m). Default: the larger of --radius-m and 10000.
    #[arg(long, env = "RIDELOCK_MAX_RADIUS_M")]
    pub max_radius_m: Option<f64>,

    /// Drivers one request is offered to at most, nearest first; when that
    /// many have declined or let the offer expire, the rider gets `no_driver`.
    #[arg(long, env = "RIDELOCK_MAX_CANDIDATES", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_candidates: u32,

    /// Requests one rider may have in flight at once, over all of that
    /// rider's connections.
    #[arg(long, env = "RIDELOCK_MAX_REQUESTS_PER_RIDER", default_value_t = 8)]
    pub max_requests_per_rider: usize,

    /// Searches in flight at most, over all riders (looking, offered, or
    /// parked waiting for a driver); past it, new requests get `overloaded`.
    #[arg(long, env = "RIDELOCK_MAX_SEARCHES", default_value_t = 100_000)]
    pub max_searches: usize,

    /// Ride requests that may wait for the matcher at once; past this, new
    /// requests are refused with `overloaded` (the matcher is behind).
    #[arg(long, env = "RIDELOCK_MAX_QUEUED_REQUESTS", default_value_t = 4096)]
    pub max_queued_requests: usize,

    /// Frames per second one connection may send (text, binary and pings
    /// alike), sustained; bursts of twice this are allowed. Past it the
    /// connection is read at this rate (later frames wait, with one
    /// `rate_limited` error per second), and one that keeps frames waiting
    /// for ten seconds in a row is closed with 1008.
    #[arg(long, env = "RIDELOCK_MAX_MESSAGES_PER_S", default_value_t = 50)]
    pub max_messages_per_s: u32,

    /// Largest WebSocket message (and frame) accepted, in bytes; larger ones
    /// close that connection with code 1009.
    #[arg(long, env = "RIDELOCK_MAX_MESSAGE_BYTES", default_value_t = 4096)]
    pub max_message_bytes: usize,

    /// How often an idle connection is pinged, in milliseconds.
    #[arg(long, env = "RIDELOCK_PING_INTERVAL_MS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub ping_interval_ms: u64,

    /// A connection silent this long (no frame, not even a pong) is closed
    /// with 1001, in milliseconds, so that a driver whose phone vanished stops
    /// being offered.
    #[arg(long, env = "RIDELOCK_CLIENT_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub client_timeout_ms: u64,

    /// Longest one write to a client may take, in milliseconds; a client that
    /// leaves its socket buffer full this long is disconnected.
    #[arg(long, env = "RIDELOCK_WRITE_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub write_timeout_ms: u64,

    /// Time a client has to send its request head and complete the HTTP
    /// exchange or WebSocket handshake, in milliseconds.
    #[arg(long, env = "RIDELOCK_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub handshake_timeout_ms: u64,

    /// Messages the engine may queue for one connection; a client that lets
    /// more pile up is not reading and is closed with 1008.
    #[arg(long, env = "RIDELOCK_OUTBOX_CAPACITY", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub outbox_capacity: u32,

    /// Threads running driver actors (actix arbiters); 0 means one per core.
    #[arg(long, env = "RIDELOCK_DRIVER_THREADS", default_value_t = 0)]
    pub driver_threads: usize,

    /// Threads serving sockets and parsing JSON (the tokio runtime of the
    /// `ridelock` binary); 0 means one per core.
    #[arg(long, env = "RIDELOCK_IO_THREADS", default_value_t = 0)]
    pub io_threads: usize,

    /// Cluster mode: the Redis servers that hold the drivers' locks,
    /// comma-separated (`redis://h1:6379,redis://h2:6379,redis://h3:6379`).
    /// One server is enough when it is trusted to stay up; several
    /// independent ones are used as a Redlock majority. Empty (the default):
    /// one engine on its own, no Redis. See docs/cluster.md.
    #[arg(long = "redis", env = "RIDELOCK_REDIS", value_delimiter = ',')]
    pub redis: Vec<String>,

    /// Cluster mode: this node's id, unique in the cluster (letters, digits,
    /// `-`, `_`, `.`). Defaults to `node-` and a random suffix.
    #[arg(long, env = "RIDELOCK_NODE_ID")]
    pub node_id: Option<String>,

    /// Cluster mode: how long one Redis server may take to answer, in
    /// milliseconds. Keep it far below the offer timeout, and well under a
    /// second: with a server dead every lock attempt waits it out, and a
    /// lock for a rider on another node whose answer comes more than 1 s
    /// after the request reached the driver grants nothing (its requester
    /// gives up at 2 s).
    #[arg(long, env = "RIDELOCK_REDIS_TIMEOUT_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub redis_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config::parse_from(["ridelock"])
    }
}

impl Config {
    /// The offer timeout as a duration.
    pub fn offer_timeout(&self) -> Duration {
        Duration::from_millis(self.offer_timeout_ms)
    }

    /// How old a driver's location may grow, as a duration.
    pub fn location_max_age(&self) -> Duration {
        Duration::from_secs(self.location_max_age_s)
    }

    /// How new requests get their first driver, for the core.
    pub fn dispatch(&self) -> Dispatch {
        match self.dispatch {
            DispatchMode::Greedy => Dispatch::Greedy,
            DispatchMode::Batch => Dispatch::Batch {
                window: Duration::from_millis(self.batch_window_ms),
                wait_m: self.batch_wait_m,
                max_waits: self.batch_max_waits,
            },
        }
    }

    /// How far a waiting request's radius grows at most, in metres.
    pub fn max_radius_m(&self) -> f64 {
        self.max_radius_m
            .unwrap_or(self.radius_m.max(DEFAULT_MAX_RADIUS_M))
    }

    /// How often a waiting request's radius grows, as a duration.
    pub fn radius_step(&self) -> Duration {
        Duration::from_millis(self.radius_step_ms)
    }

    /// The search timeout as a duration.
    pub fn search_timeout(&self) -> Duration {
        Duration::from_millis(self.search_timeout_ms)
    }

    /// The ping interval as a duration.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }

    /// The client silence timeout as a duration.
    pub fn client_timeout(&self) -> Duration {
        Duration::from_millis(self.client_timeout_ms)
    }

    /// The write timeout as a duration.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// The handshake timeout as a duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// The token leeway as a duration.
    pub fn token_leeway(&self) -> Duration {
        Duration::from_secs(self.token_leeway_s)
    }

    /// The per-server Redis timeout as a duration.
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    /// Whether the engine runs as a node of a cluster (Redis configured).
    pub fn is_cluster(&self) -> bool {
        !self.redis.is_empty()
    }

    /// Driver threads, with 0 resolved to the number of cores.
    pub fn driver_threads(&self) -> usize {
        per_core_if_zero(self.driver_threads)
    }

    /// I/O threads, with 0 resolved to the number of cores.
    pub fn io_threads(&self) -> usize {
        per_core_if_zero(self.io_threads)
    }
}

fn per_core_if_zero(threads: usize) -> usize {
    match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// The widest a search radius grows by default, in metres.
pub const DEFAULT_MAX_RADIUS_M: f64 = 10_000.0;

/// `--dispatch`: how new requests get their first driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DispatchMode {
    /// Each request asks its nearest free driver as it arrives.
    Greedy,
    /// Requests within a window are assigned together.
    Batch,
}
