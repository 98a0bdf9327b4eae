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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use futures_util::future::join_all;
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::store::{alive_key, LockServer};
use super::wire::{node_channel, NodeId, Wire, DRIVERS_CHANNEL};
use super::Cluster;
use crate::actors::driver::{ConnectedElsewhere, DriverRegistry};
use crate::actors::matcher::{LiveNodes, Matcher, NodeGone, RemoteDriver, RemoteSnapshot};
use crate::actors::messages::{
    CancelOffer, DriverDirectory, LockAnswered, OfferEnded, ReplyRoute, ToDriver, TryLock,
};
use crate::core::booking::{LockRequest, ReplyTo};
use crate::core::search::{LockAnswer, OfferOutcome};
use crate::core::{Granted, OfferHolder};
use crate::location::LatLon;
use crate::protocol::DriverId;

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
            cluster.spawn(publish(cluster.clone(), directed)),
            cluster.spawn(listen(cluster.clone(), matcher, registry)),
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

/// The publisher task.
async fn publish(cluster: Arc<Cluster>, mut directed: mpsc::UnboundedReceiver<super::Outgoing>) {
    // This node's offerable drivers, for servers that lost them.
    let mut own: HashMap<DriverId, LatLon> = HashMap::new();
    let mut alive = tokio::time::interval(ALIVE_REFRESH);
    alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut messages = Vec::new();
        tokio::select! {
            message = directed.recv() => match message {
                Some(message) => messages.push(message),
                None => return,
            },
            _ = cluster.announced.notified() => {}
            _ = alive.tick() => {
                tracing::trace!("refreshing liveness");
                refresh_alive(&cluster, &own).await;
                continue;
            }
        }
        while let Ok(message) = directed.try_recv() {
            messages.push(message);
        }
        let changes = cluster.take_pending();
        for (driver, at) in &changes {
            match at {
                Some(at) => own.insert(driver.clone(), *at),
                None => own.remove(driver),
            };
        }
        let node = &cluster.node;
        let mut pipe = redis::pipe();
        for (driver, at) in &changes {
            match at {
                Some(at) => pipe
                    .cmd("HSET")
                    .arg(drivers_key(node))
                    .arg(&**driver)
                    .arg(encode_at(*at))
                    .ignore(),
                None => pipe
                    .cmd("HDEL")
                    .arg(drivers_key(node))
                    .arg(&**driver)
                    .ignore(),
            };
            let wire = Wire::Driver {
                node: node.clone(),
                driver: driver.clone(),
                at: *at,
            };
            publish_cmd(&mut pipe, DRIVERS_CHANNEL, &wire);
        }
        for (to, wire) in &messages {
            match to {
                Some(node) => publish_cmd(&mut pipe, &node_channel(node), wire),
                None => publish_cmd(&mut pipe, DRIVERS_CHANNEL, wire),
            }
        }
        let sent = join_all(
            cluster
                .locks
                .server_list()
                .iter()
                .map(|server| run_pipe(server, pipe.clone())),
        )
        .await;
        for ok in sent {
            crate::metrics::cluster_published(changes.len() + messages.len(), ok);
        }
    }
}

fn publish_cmd(pipe: &mut redis::Pipeline, channel: &str, wire: &Wire) {
    let payload = serde_json::to_string(wire).expect("wire messages serialize");
    pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
}

/// Keeps this node's liveness key alive on every server; a server that has
/// lost it (restarted empty, or this node was paused past the key's life)
/// gets this node's drivers again, republished so that listeners learn them.
async fn refresh_alive(cluster: &Cluster, own: &HashMap<DriverId, LatLon>) {
    let node = &cluster.node;
    join_all(cluster.locks.server_list().iter().map(|server| async move {
        let mut connection = server.connection();
        // Listed on every refresh too: a node taken for dead by a slow check
        // lists itself again.
        let mut refresh = redis::pipe();
        refresh
            .cmd("PEXPIRE")
            .arg(alive_key(node))
            .arg(ALIVE_TTL.as_millis() as u64)
            .cmd("SADD")
            .arg(NODES_KEY)
            .arg(&**node)
            .ignore();
        let kept = tokio::time::timeout(
            server.timeout(),
            refresh.query_async::<(i64,)>(&mut connection),
        )
        .await;
        match &kept {
            Ok(Ok((0,))) => {}
            Ok(Ok(_)) => return, // kept alive
            Ok(Err(e)) => {
                return tracing::debug!(server = server.url(), "liveness refresh failed: {e}")
            }
            Err(_) => return tracing::debug!(server = server.url(), "liveness refresh timed out"),
        }
        let mut pipe = redis::pipe();
        pipe.cmd("SADD").arg(NODES_KEY).arg(&**node).ignore();
        pipe.cmd("SET")
            .arg(alive_key(node))
            .arg(1)
            .arg("PX")
            .arg(ALIVE_TTL.as_millis() as u64)
            .ignore();
        pipe.cmd("DEL").arg(drivers_key(node)).ignore();
        for (driver, at) in own {
            pipe.cmd("HSET")
                .arg(drivers_key(node))
                .arg(&**driver)
                .arg(encode_at(*at))
                .ignore();
            let wire = Wire::Driver {
                node: node.clone(),
                driver: driver.clone(),
                at: Some(*at),
            };
            publish_cmd(&mut pipe, DRIVERS_CHANNEL, &wire);
        }
        if run_pipe(server, pipe).await {
            tracing::info!(
                server = server.url(),
                drivers = own.len(),
                "announced this node"
            );
        }
    }))
    .await;
}

/// The listener task: subscribed to one server at a time, round the list.
async fn listen(cluster: Arc<Cluster>, matcher: Addr<Matcher>, registry: Arc<DriverRegistry>) {
    let mut next = 0;
    let mut delay = RESUBSCRIBE_DELAY;
    loop {
        let server = &cluster.locks.server_list()[next % cluster.urls.len()];
        next += 1;
        let subscribed_at = Instant::now();
        match listen_on(&cluster, server, &matcher, &registry).await {
            Ok(()) => tracing::warn!(server = server.url(), "lost the cluster subscription"),
            Err(e) => tracing::warn!(server = server.url(), "cluster subscription failed: {e}"),
        }
        // A subscription that lasted resets the back-off; repeated failures
        // (Redis down) retry ever more slowly, up to the maximum.
        delay = if subscribed_at.elapsed() > RESUBSCRIBE_DELAY_MAX * 5 {
            RESUBSCRIBE_DELAY
        } else {
            (delay * 2).min(RESUBSCRIBE_DELAY_MAX)
        };
        tokio::time::sleep(delay).await;
    }
}

async fn listen_on(
    cluster: &Arc<Cluster>,
    server: &LockServer,
    matcher: &Addr<Matcher>,
    registry: &Arc<DriverRegistry>,
) -> Result<(), redis::RedisError> {
    let timeout = server.timeout() * 4;
    let client = redis::Client::open(server.url())?;
    let mut pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
        .await
        .map_err(|_| io_timeout())??;
    // A server that accepts connections but doesn't answer (paused) must not
    // hold the listener: subscribing has a timeout like everything else.
    tokio::time::timeout(timeout, pubsub.subscribe(DRIVERS_CHANNEL))
        .await
        .map_err(|_| io_timeout())??;
    tokio::time::timeout(timeout, pubsub.subscribe(node_channel(&cluster.node)))
        .await
        .map_err(|_| io_timeout())??;
    // Subscribed first, then the snapshot: a change in between is in both,
    // and both say the same. The listener's reads (whole hashes, at scale
    // megabytes) get a connection of their own, so that lock calls never
    // queue behind them.
    // (Each command carries its own timeout; the client's default of 500 ms
    // would cut a large load short.)
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut connection = tokio::time::timeout(
        timeout,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .map_err(|_| io_timeout())??;
    let mut live = snapshot(cluster, &mut connection, matcher, registry, timeout).await?;
    tracing::info!(
        server = server.url(),
        nodes = live.len(),
        "joined the cluster"
    );
    let mut messages = pubsub.into_on_message();
    let mut check = tokio::time::interval(ALIVE_REFRESH);
    let mut failed_checks = 0;
    let mut checks: u32 = 0;
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { return Ok(()) };
                match serde_json::from_slice::<Wire>(message.get_payload_bytes()) {
                    Ok(wire) => deliver(cluster, wire, matcher, registry),
                    Err(e) => tracing::warn!("unreadable cluster message: {e}"),
                }
            }
            _ = check.tick() => {
                checks = checks.wrapping_add(1);
                // Now and then, everything again: an announcement lost on its
                // way (pub/sub is at most once) is not repeated until the
                // driver changes, and a parked driver doesn't.
                let result = if checks % RESYNC_EVERY == 0 {
                    snapshot(cluster, &mut connection, matcher, registry, timeout)
                        .await
                        .map(|now_live| live = now_live)
                } else {
                    check_nodes(cluster, &mut connection, &mut live, matcher, registry, timeout).await
                };
                match result {
                    Ok(()) => failed_checks = 0,
                    Err(e) => {
                        failed_checks += 1;
                        if failed_checks >= CHECKS_BEFORE_SWITCH {
                            return Err(e);
                        }
                    }
                }
            }
        }
    }
}

fn io_timeout() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no answer from redis",
    ))
}

async fn query<T: redis::FromRedisValue>(
    cmd: &redis::Cmd,
    connection: &mut MultiplexedConnection,
    timeout: Duration,
) -> Result<T, redis::RedisError> {
    tokio::time::timeout(timeout, cmd.query_async(connection))
        .await
        .map_err(|_| io_timeout())?
}

/// Loads the drivers of every live node but this one (the matcher forgets
/// any other node's); the set of live nodes.
async fn snapshot(
    cluster: &Cluster,
    connection: &mut MultiplexedConnection,
    matcher: &Addr<Matcher>,
    registry: &DriverRegistry,
    timeout: Duration,
) -> Result<HashSet<NodeId>, redis::RedisError> {
    let nodes: Vec<String> =
        query(redis::cmd("SMEMBERS").arg(NODES_KEY), connection, timeout).await?;
    let mut live = HashSet::new();
    for node in nodes {
        if *node == *cluster.node {
            continue;
        }
        let node: NodeId = node.into();
        if load_node(&node, connection, matcher, timeout).await? {
            live.insert(node);
        } else if forget_dead(&node, connection, timeout).await {
            node_gone(&node, matcher, registry);
        }
    }
    matcher.do_send(LiveNodes {
        nodes: live.iter().cloned().collect(),
    });
    Ok(live)
}

/// Loads `node`'s drivers into the matcher if it is alive; whether it is.
async fn load_node(
    node: &NodeId,
    connection: &mut MultiplexedConnection,
    matcher: &Addr<Matcher>,
    timeout: Duration,
) -> Result<bool, redis::RedisError> {
    let alive: bool = query(
        redis::cmd("EXISTS").arg(alive_key(node)),
        connection,
        timeout,
    )
    .await?;
    if !alive {
        return Ok(false);
    }
    // A whole node's drivers: more time than a single-key command.
    let entries: HashMap<String, String> = query(
        redis::cmd("HGETALL").arg(drivers_key(node)),
        connection,
        timeout * BULK_TIMEOUT_FACTOR,
    )
    .await?;
    let drivers = entries
        .into_iter()
        .filter_map(|(driver, at)| Some((DriverId::from(driver), decode_at(&at)?)))
        .collect();
    matcher.do_send(RemoteSnapshot {
        node: node.clone(),
        drivers,
    });
    Ok(true)
}

/// Forgets `node` in Redis if it is (still) dead; whether it was.
async fn forget_dead(
    node: &NodeId,
    connection: &mut MultiplexedConnection,
    timeout: Duration,
) -> bool {
    let mut invocation = FORGET_DEAD_SCRIPT.prepare_invoke();
    invocation
        .key(NODES_KEY)
        .key(alive_key(node))
        .key(drivers_key(node))
        .arg(&**node);
    matches!(
        tokio::time::timeout(timeout, invocation.invoke_async::<i64>(connection)).await,
        Ok(Ok(1))
    )
}

/// Drops the drivers of nodes whose liveness key lapsed, and loads those of
/// nodes that (re)appeared.
async fn check_nodes(
    cluster: &Cluster,
    connection: &mut MultiplexedConnection,
    live: &mut HashSet<NodeId>,
    matcher: &Addr<Matcher>,
    registry: &DriverRegistry,
    timeout: Duration,
) -> Result<(), redis::RedisError> {
    let nodes: Vec<String> =
        query(redis::cmd("SMEMBERS").arg(NODES_KEY), connection, timeout).await?;
    let mut seen = HashSet::new();
    for node in nodes {
        if *node == *cluster.node {
            continue;
        }
        let node: NodeId = node.into();
        let alive: bool = query(
            redis::cmd("EXISTS").arg(alive_key(&node)),
            connection,
            timeout,
        )
        .await?;
        if !alive {
            if !forget_dead(&node, connection, timeout).await && live.contains(&node) {
                // Back just as it was about to be forgotten (or Redis did not
                // answer): leave it as it was.
                seen.insert(node);
            }
            // Otherwise dead, and forgotten everywhere: dropped below if it
            // was live here.
        } else if live.contains(&node) {
            seen.insert(node);
        } else if load_node(&node, connection, matcher, timeout).await? {
            // New, or back after being taken for dead: what it announced
            // meanwhile may have been dropped here.
            seen.insert(node);
        }
    }
    for gone in live.difference(&seen) {
        tracing::info!(node = %gone, "node left the cluster; dropping its drivers");
        node_gone(gone, matcher, registry);
    }
    *live = seen;
    Ok(())
}

/// `node` died or left: the matcher drops its drivers and settles offers out
/// to them; this node's drivers withdraw offers held for its riders.
fn node_gone(node: &NodeId, matcher: &Addr<Matcher>, registry: &DriverRegistry) {
    matcher.do_send(NodeGone { node: node.clone() });
    registry.holder_node_gone(node);
}

/// Hands one message to whoever it is for.
fn deliver(
    cluster: &Arc<Cluster>,
    wire: Wire,
    matcher: &Addr<Matcher>,
    registry: &Arc<DriverRegistry>,
) {
    match wire {
        Wire::Driver { node, driver, at } => {
            if node != cluster.node {
                matcher.do_send(RemoteDriver { node, driver, at });
            }
        }
        Wire::Attached { node, driver } => {
            if node != cluster.node {
                if let Some(actor) = registry.get(&driver) {
                    actor.do_send(ConnectedElsewhere { node });
                }
            }
        }
        Wire::Lock {
            from,
            driver,
            offer_id,
            search,
            rider_id,
            request_id,
            pickup,
            timeout_ms,
            search_left_ms,
        } => {
            let holder = OfferHolder {
                search,
                rider_id,
                request_id,
                pickup,
                first_offer_since: None,
                node: Some(from.clone()),
            };
            let request = LockRequest {
                offer_id,
                holder,
                timeout: Duration::from_millis(timeout_ms),
                not_after: Instant::now() + Duration::from_millis(search_left_ms),
                reply: ReplyTo::Node(from.clone()),
            };
            let route = ReplyRoute::Node(cluster.clone(), from);
            // Not connected here (any more): the request's drop refuses.
            let message = TryLock::new(driver.clone(), request, route);
            registry.send(&driver, ToDriver::Lock(message));
        }
        Wire::Answer {
            driver,
            offer_id,
            search,
            rider_id,
            request_id,
            result,
            from,
        } => matcher.do_send(LockAnswered(LockAnswer {
            driver_id: driver,
            offer_id,
            search,
            rider_id,
            request_id,
            result: result.map(|fencing_token| Granted { fencing_token }),
            node: from,
        })),
        Wire::Ended {
            driver,
            at,
            offer_id,
            search,
            rider_id,
            request_id,
            ending,
            trip_id,
            ..
        } => matcher.do_send(OfferEnded(OfferOutcome {
            driver_id: driver,
            driver_location: at,
            offer_id,
            search,
            rider_id,
            request_id,
            ending,
            trip_id,
        })),
        Wire::Cancel {
            driver,
            offer_id,
            fencing_token,
        } => registry.send(
            &driver,
            ToDriver::Cancel(CancelOffer {
                offer_id,
                fencing_token,
            }),
        ),
    }
}
