//! The tasks that connect a node to the others through Redis.
//!
//! - The publisher sends this node's messages: availability changes of its
//!   drivers (on [`DRIVERS_CHANNEL`], mirrored into this node's hash
//!   `ridelock:node:{id}:drivers` for late joiners) and messages to other
//!   nodes. It writes to every server, so that any one of them is enough to
//!   listen to. Once a second it refreshes this node's liveness key on each
//!   server; a server that lost it (restarted empty) gets this node's whole
//!   state again.
//! - The listener subscribes on one server at a time (the next one when that
//!   connection is lost), loads every live node's hash when it subscribes,
//!   hands messages to the matcher and to driver actors, and once a second
//!   drops the drivers of nodes whose liveness key has lapsed (a node that
//!   died: its drivers are offerable again once they reconnect elsewhere).

mod listen;
mod publish;

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use futures_util::future::join_all;
use tokio::task::JoinHandle;

use super::store::{alive_key, LockServer};
use super::Cluster;
use crate::actors::driver::DriverRegistry;
use crate::actors::matcher::Matcher;
use crate::location::LatLon;

/// How often liveness keys are refreshed and checked.
const ALIVE_REFRESH: Duration = Duration::from_secs(1);
/// How long a node's liveness key lives: a node silent this long is dead.
/// Five refreshes' worth, so that a node whose cores are busy for a few
/// seconds is not taken for dead.
const ALIVE_TTL: Duration = Duration::from_secs(5);
/// Wait before subscribing again after losing the subscription, doubling
/// up to the maximum while no server can be subscribed to.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(200);
const RESUBSCRIBE_DELAY_MAX: Duration = Duration::from_secs(2);
/// Liveness checks in a row that may fail before the listener gives up on
/// its server (a paused server keeps the socket open but answers nothing).
const CHECKS_BEFORE_SWITCH: u32 = 3;

/// How many times the per-server timeout a whole node's drivers may take to
/// load.
const BULK_TIMEOUT_FACTOR: u32 = 20;

/// Liveness checks between two full reloads of the other nodes' drivers.
const RESYNC_EVERY: u32 = 30;

/// Forgets a node whose liveness key has lapsed, atomically with the check,
/// so that a node that comes back at that moment (it re-creates its key
/// before re-announcing) is never forgotten after it came back.
/// KEYS: the node set, the node's liveness key, the node's drivers.
/// ARGV: the node. Returns 1 if it was forgotten.
const FORGET_DEAD: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
"#;

static FORGET_DEAD_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(FORGET_DEAD));

/// The set of live node ids, on every server.
const NODES_KEY: &str = "ridelock:nodes";

fn drivers_key(node: &str) -> String {
    format!("ridelock:node:{node}:drivers")
}

fn encode_at(at: LatLon) -> String {
    format!("{},{}", at.lat, at.lon)
}

fn decode_at(text: &str) -> Option<LatLon> {
    let (lat, lon) = text.split_once(',')?;
    LatLon::new(lat.parse().ok()?, lon.parse().ok()?).ok()
}

/// The running tasks; dropping this does not stop them, [`Bus::stop`] does.
pub struct Bus {
    tasks: Vec<JoinHandle<()>>,
    cluster: Arc<Cluster>,
}

impl Bus {
    /// Registers this process before it serves: its liveness key, holding
    /// its incarnation, on every server, and this node's announced drivers
    /// cleared (a node restarted under the same id starts from nothing).
    /// From then on, a confirm for a rider of an earlier process of this
    /// node fails. A majority of servers must take it.
    pub async fn register(cluster: &Cluster) -> Result<(), String> {
        let node = &cluster.node;
        let incarnation = cluster.incarnation.to_string();
        let done = join_all(cluster.locks.server_list().iter().map(|server| {
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(alive_key(node))
                .arg(&incarnation)
                .arg("PX")
                .arg(ALIVE_TTL.as_millis() as u64)
                .ignore();
            pipe.cmd("SADD").arg(NODES_KEY).arg(&**node).ignore();
            pipe.cmd("DEL").arg(drivers_key(node)).ignore();
            run_pipe(server, pipe)
        }))
        .await;
        let registered = done.into_iter().filter(|ok| *ok).count();
        let servers = cluster.locks.servers();
        if registered >= super::redlock::quorum(servers) {
            Ok(())
        } else {
            Err(format!(
                "could register node {node} on only {registered} of {servers} Redis servers"
            ))
        }
    }

    /// Starts the publisher and the listener on the cluster's Redis runtime.
    pub fn start(
        cluster: Arc<Cluster>,
        matcher: Addr<Matcher>,
        registry: Arc<DriverRegistry>,
    ) -> Bus {
        let directed = cluster
            .directed_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("the bus starts once per cluster link");
        let tasks = vec![
            cluster.spawn(publish::publish(cluster.clone(), directed)),
            cluster.spawn(listen::listen(cluster.clone(), matcher, registry)),
        ];
        Bus { tasks, cluster }
    }

    /// Stops the tasks and takes this node out of the cluster at once
    /// (without waiting for its liveness key to lapse), best effort.
    pub async fn stop(self) {
        self.abort();
        let node = self.cluster.node.clone();
        join_all(self.cluster.locks.server_list().iter().map(|server| {
            let mut pipe = redis::pipe();
            pipe.cmd("SREM").arg(NODES_KEY).arg(&*node).ignore();
            pipe.cmd("DEL").arg(alive_key(&node)).ignore();
            pipe.cmd("DEL").arg(drivers_key(&node)).ignore();
            run_pipe(server, pipe)
        }))
        .await;
    }
}

impl Bus {
    fn abort(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.abort();
    }
}

async fn run_pipe(server: &LockServer, pipe: redis::Pipeline) -> bool {
    let mut connection = server.connection();
    matches!(
        tokio::time::timeout(server.timeout(), pipe.query_async::<()>(&mut connection)).await,
        Ok(Ok(()))
    )
}
