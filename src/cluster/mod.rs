//! Cluster mode: several engine nodes serving one city, driver locks in Redis.
//!
//! Each node keeps the design of the single engine (a driver's actor is the
//! only place its lock changes, the matcher owns an R-tree of offerable
//! drivers) and adds three things, all through Redis (`docs/cluster.md` has
//! the design, its costs and its failure cases):
//!
//! - every node announces its drivers' availability on a pub/sub channel and
//!   keeps a hash of them for nodes that join or resubscribe later, so every
//!   matcher indexes every offerable driver of the city ([`bus`]);
//! - a driver's lock is a Redis key taken by the driver's own actor, with a
//!   fencing token from a per-driver counter taken in the same Lua script,
//!   across a Redlock majority when there are several servers ([`store`],
//!   [`redlock`]); an `accept` books only if the lock still holds
//!   (`confirm`), so a node that stalled past the expiry can't book late;
//! - a rider's node asks a driver's node for an offer, and hears the answer
//!   and the outcome, over per-node channels ([`wire`]); if news is lost, the
//!   rider's node settles the lock in Redis itself, which tells it for certain
//!   whether the driver accepted and stops any later acceptance.

pub mod bus;
pub mod redlock;
pub mod store;
pub mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::location::LatLon;
use crate::protocol::DriverId;
use store::{Redlock, StoreError};
pub use wire::NodeId;
use wire::Wire;

pub use crate::core::booking::LOCK_MARGIN;
pub use crate::core::owner;
use crate::core::Incarnation;

/// Whether `node` is usable as a node id: it is part of Redis keys, channel
/// names and lock owner values.
pub fn valid_node_id(node: &str) -> bool {
    !node.is_empty()
        && node.len() <= 64
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// A thread of its own for Redis I/O. Lock calls have a short timeout
/// (`--redis-timeout-ms`); if the connections' socket I/O ran on the same
/// runtime as thousands of WebSocket sessions, a node busy with its sockets
/// would time out its own lock calls although Redis answered at once. Here
/// a reply is read as soon as it arrives.
struct RedisRuntime(Option<tokio::runtime::Runtime>);

impl RedisRuntime {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ridelock-redis")
            .enable_all()
            .build()
            .expect("a one-thread runtime starts");
        RedisRuntime(Some(runtime))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("running until dropped").handle()
    }
}

impl Drop for RedisRuntime {
    fn drop(&mut self) {
        // The last reference may go inside an async task, where a blocking
        // shutdown would panic.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A message to publish: to one node, or (`None`) on the drivers channel.
type Outgoing = (Option<NodeId>, Wire);

/// One node's link to the cluster: its lock store and its outgoing messages.
pub struct Cluster {
    /// The runtime that does all Redis I/O (see [`RedisRuntime`]).
    runtime: RedisRuntime,
    node: NodeId,
    /// This process (see [`Incarnation`]).
    incarnation: Incarnation,
    urls: Vec<String>,
    locks: Redlock,
    /// Availability changes of this node's drivers not yet published,
    /// coalesced per driver (only the newest matters), so a slow Redis makes
    /// announcements late, never unbounded.
    pending: Mutex<HashMap<DriverId, Option<LatLon>>>,
    announced: Notify,
    directed: mpsc::UnboundedSender<Outgoing>,
    directed_rx: Mutex<Option<mpsc::UnboundedReceiver<Outgoing>>>,
}

impl Cluster {
    /// Connects to every Redis server; any one unreachable is an error, so
    /// that a wrong URL is found at start rather than as lost quorum later.
    pub async fn connect(
        node: &str,
        urls: &[String],
        per_server_timeout: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let runtime = RedisRuntime::start();
        // Connected from the Redis runtime, so that the connections' own
        // tasks (which do the socket I/O) live there.
        let connect_urls = urls.to_vec();
        let locks = runtime
            .handle()
            .spawn(async move { Redlock::connect(&connect_urls, per_server_timeout).await })
            .await
            .expect("connecting to redis does not panic")?;
        let (directed, directed_rx) = mpsc::unbounded_channel();
        Ok(Arc::new(Cluster {
            runtime,
            node: node.into(),
            // Random and never 0 (0 stands for "this node" in offers).
            incarnation: rand::random::<u64>() | 1,
            urls: urls.to_vec(),
            locks,
            pending: Mutex::default(),
            announced: Notify::new(),
            directed,
            directed_rx: Mutex::new(Some(directed_rx)),
        }))
    }

    /// Runs `task` on the Redis runtime.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.handle().spawn(task)
    }

    /// This node's id.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// This process's incarnation: its liveness key holds it, and other
    /// nodes take a new value for a restart (everything the old process
    /// held is gone).
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// The driver locks.
    pub fn locks(&self) -> &Redlock {
        &self.locks
    }

    /// This node's driver is offerable at `at` (or, `None`, no longer):
    /// published to the other nodes soon, coalesced with later changes.
    pub fn announce(&self, driver: &DriverId, at: Option<LatLon>) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(driver.clone(), at);
        self.announced.notify_one();
    }

    /// Sends `message` to `node` (at most once; see [`wire`]).
    pub fn send(&self, node: &NodeId, message: Wire) {
        // Fails only once the publisher has stopped (shutdown).
        let _ = self.directed.send((Some(node.clone()), message));
    }

    /// Publishes `message` to every node, on the drivers channel.
    pub fn broadcast(&self, message: Wire) {
        let _ = self.directed.send((None, message));
    }

    fn take_pending(&self) -> Vec<(DriverId, Option<LatLon>)> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect()
    }
}
