//! Engine configuration: clap flags, each with an environment-variable
//! fallback, documented field by field.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// How a ridelock engine runs.
#[derive(Clone, Debug, Parser)]
#[command(name = "ridelock", version, about = "Ride-sharing matchmaking engine")]
pub struct Config {
    /// Address to serve WebSockets, /metrics and /healthz on.
    #[arg(long, env = "RIDELOCK_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

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
    /// offered, in metres.
    #[arg(long, env = "RIDELOCK_RADIUS_M", default_value_t = 5_000.0)]
    pub radius_m: f64,

    /// Drivers one request is offered to at most, nearest first; when that
    /// many have declined or let the offer expire, the rider gets `no_driver`.
    #[arg(long, env = "RIDELOCK_MAX_CANDIDATES", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_candidates: u32,

    /// Requests one rider may have in flight at once.
    #[arg(long, env = "RIDELOCK_MAX_REQUESTS_PER_RIDER", default_value_t = 8)]
    pub max_requests_per_rider: usize,

    /// Ride requests that may wait for the matcher at once; past this, new
    /// requests are refused with `overloaded` (the matcher is behind).
    #[arg(long, env = "RIDELOCK_MAX_QUEUED_REQUESTS", default_value_t = 4096)]
    pub max_queued_requests: usize,

    /// Messages per second one connection may send, sustained; bursts of twice
    /// this are allowed. Past it the client gets `rate_limited`.
    #[arg(long, env = "RIDELOCK_MAX_MESSAGES_PER_S", default_value_t = 50)]
    pub max_messages_per_s: u32,

    /// Largest WebSocket message (and frame) accepted, in bytes; larger ones
    /// close that connection with code 1009.
    #[arg(long, env = "RIDELOCK_MAX_MESSAGE_BYTES", default_value_t = 4096)]
    pub max_message_bytes: usize,

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
    /// milliseconds. Keep it far below the offer timeout: a dead server then
    /// costs little, and the lock's validity is what is left after it.
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

    /// The search timeout as a duration.
    pub fn search_timeout(&self) -> Duration {
        Duration::from_millis(self.search_timeout_ms)
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
