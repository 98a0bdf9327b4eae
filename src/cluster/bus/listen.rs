//! The listener: subscribed on one server at a time, it hands other nodes'
//! messages to the matcher and the driver actors, and keeps track of which
//! nodes (and which processes of them) are alive.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use futures_util::future::join_all;
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;

use super::{
    decode_at, drivers_key, ALIVE_REFRESH, BULK_TIMEOUT_FACTOR, CHECKS_BEFORE_SWITCH,
    FORGET_DEAD_SCRIPT, NODES_KEY, RESUBSCRIBE_DELAY, RESUBSCRIBE_DELAY_MAX, RESYNC_EVERY,
};
use crate::actors::driver::{ConnectedElsewhere, DriverRegistry, LookUpTrip};
use crate::actors::matcher::{
    LiveNodes, Matcher, NodeGone, RemoteDriver, RemoteDrivers, RemoteSnapshot,
};
use crate::actors::messages::{
    CancelOffer, DriverDirectory, GroupNews, LockAnswered, OfferEnded, OfferHeld, ReplyRoute,
    ToDriver, TryLock,
};
use crate::actors::remote::Wounded;
use crate::cluster::store::{alive_key, LockServer};
use crate::cluster::wire::{node_channel, NodeId, Wire, DRIVERS_CHANNEL};
use crate::cluster::Cluster;
use crate::core::booking::{LockRequest, ReplyTo};
use crate::core::search::{LockAnswer, OfferOutcome};
use crate::core::{Granted, GroupTag, Incarnation, OfferHolder};
use crate::protocol::DriverId;

/// The listener task: subscribed to one server at a time, round the list.
pub(super) async fn listen(
    cluster: Arc<Cluster>,
    matcher: Addr<Matcher>,
    registry: Arc<DriverRegistry>,
) {
    let mut next = 0;
    let mut delay = RESUBSCRIBE_DELAY;
    // Which process of each other node is alive, kept across subscriptions:
    // a node that died or restarted while this one was resubscribing is
    // still seen gone.
    let mut live = HashMap::new();
    loop {
        let server = &cluster.locks.server_list()[next % cluster.urls.len()];
        next += 1;
        let subscribed_at = Instant::now();
        match listen_on(&cluster, server, &matcher, &registry, &mut live).await {
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
    live: &mut HashMap<NodeId, Incarnation>,
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
    *live = snapshot(cluster, &mut connection, matcher, registry, timeout, live).await?;
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
                crate::metrics::cluster_received(1, 0);
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
                    snapshot(cluster, &mut connection, matcher, registry, timeout, live)
                        .await
                        .map(|now_live| *live = now_live)
                } else {
                    check_nodes(cluster, &mut connection, live, matcher, registry, timeout).await
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
/// any other node's); the live nodes and their incarnations. A node that
/// restarted since `before` is gone (its old process) and back (the new).
async fn snapshot(
    cluster: &Cluster,
    connection: &mut MultiplexedConnection,
    matcher: &Addr<Matcher>,
    registry: &DriverRegistry,
    timeout: Duration,
    before: &HashMap<NodeId, Incarnation>,
) -> Result<HashMap<NodeId, Incarnation>, redis::RedisError> {
    let nodes: Vec<String> =
        query(redis::cmd("SMEMBERS").arg(NODES_KEY), connection, timeout).await?;
    let mut live = HashMap::new();
    for node in nodes {
        if *node == *cluster.node {
            continue;
        }
        let node: NodeId = node.into();
        match liveness(cluster, &node).await {
            Liveness::Alive(incarnation) => {
                if let Some(&old) = before.get(&node).filter(|&&old| old != incarnation) {
                    node_gone(&node, old, matcher, registry);
                }
                load_node(&node, connection, matcher, timeout).await?;
                live.insert(node, incarnation);
            }
            Liveness::Dead => {
                forget_dead(&node, connection, timeout).await;
            }
            Liveness::Unknown => {
                if let Some(&old) = before.get(&node) {
                    live.insert(node, old);
                }
            }
        }
    }
    // Whatever was alive before and is not now (dead, forgotten, or gone
    // from the node set) is gone.
    for (node, &incarnation) in before {
        if !live.contains_key(node) {
            node_gone(node, incarnation, matcher, registry);
        }
    }
    matcher.do_send(LiveNodes {
        nodes: live.keys().cloned().collect(),
    });
    Ok(live)
}

/// Loads `node`'s drivers into the matcher.
async fn load_node(
    node: &NodeId,
    connection: &mut MultiplexedConnection,
    matcher: &Addr<Matcher>,
    timeout: Duration,
) -> Result<(), redis::RedisError> {
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
    Ok(())
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

/// Drops the drivers of nodes whose liveness key lapsed or whose process
/// changed (restarted under the same id), and loads those of nodes that
/// (re)appeared. Liveness is what a majority of the lock servers say, so
/// that one server that restarted without its data (the listener's own,
/// say) does not make every node look dead.
async fn check_nodes(
    cluster: &Cluster,
    connection: &mut MultiplexedConnection,
    live: &mut HashMap<NodeId, Incarnation>,
    matcher: &Addr<Matcher>,
    registry: &DriverRegistry,
    timeout: Duration,
) -> Result<(), redis::RedisError> {
    let listed: Vec<String> =
        query(redis::cmd("SMEMBERS").arg(NODES_KEY), connection, timeout).await?;
    // Listed here, or alive before (a server that lost the set lists none).
    let mut nodes: Vec<NodeId> = listed.into_iter().map(NodeId::from).collect();
    nodes.extend(live.keys().cloned());
    nodes.sort();
    nodes.dedup();
    let mut seen = HashMap::new();
    for node in nodes {
        if *node == *cluster.node {
            continue;
        }
        match liveness(cluster, &node).await {
            Liveness::Unknown => {
                if let Some(&old) = live.get(&node) {
                    seen.insert(node, old);
                }
            }
            Liveness::Dead => {
                if !forget_dead(&node, connection, timeout).await {
                    if let Some(&old) = live.get(&node) {
                        // Back just as it was about to be forgotten (or
                        // Redis did not answer): leave it as it was.
                        seen.insert(node, old);
                    }
                }
                // Otherwise dead, and forgotten: dropped below if it was
                // live here.
            }
            Liveness::Alive(incarnation) if live.get(&node) == Some(&incarnation) => {
                seen.insert(node, incarnation);
            }
            Liveness::Alive(incarnation) => {
                if let Some(&old) = live.get(&node) {
                    tracing::info!(node = %node, "node restarted; dropping what its old process held");
                    node_gone(&node, old, matcher, registry);
                }
                // New, restarted, or back after being taken for dead: what
                // it announced meanwhile may have been dropped here.
                load_node(&node, connection, matcher, timeout).await?;
                seen.insert(node, incarnation);
            }
        }
    }
    for (gone, &incarnation) in live.iter() {
        if !seen.contains_key(gone) {
            tracing::info!(node = %gone, "node left the cluster; dropping its drivers");
            node_gone(gone, incarnation, matcher, registry);
        }
    }
    *live = seen;
    Ok(())
}

/// What the lock servers say of a node's liveness key.
enum Liveness {
    /// A majority show this process.
    Alive(Incarnation),
    /// A majority show no key.
    Dead,
    /// Neither (servers not answering, or split).
    Unknown,
}

/// Reads `node`'s liveness key on every lock server.
async fn liveness(cluster: &Cluster, node: &NodeId) -> Liveness {
    let answers = join_all(cluster.locks.server_list().iter().map(|server| async move {
        let mut connection = server.connection();
        let mut get = redis::cmd("GET");
        get.arg(alive_key(node));
        let read = get.query_async::<Option<String>>(&mut connection);
        match tokio::time::timeout(server.timeout(), read).await {
            Ok(Ok(value)) => Some(value.and_then(|v| v.parse::<Incarnation>().ok())),
            _ => None,
        }
    }))
    .await;
    let needed = crate::cluster::redlock::quorum(answers.len());
    let shown: Vec<Option<Incarnation>> = answers.into_iter().flatten().collect();
    if let Some(&incarnation) = shown
        .iter()
        .flatten()
        .find(|&&i| shown.iter().filter(|s| **s == Some(i)).count() >= needed)
    {
        return Liveness::Alive(incarnation);
    }
    if shown.iter().filter(|s| s.is_none()).count() >= needed {
        Liveness::Dead
    } else {
        Liveness::Unknown
    }
}

/// A process of `node` died or left: the matcher drops its drivers and
/// settles offers out to them; this node's drivers withdraw offers held for
/// its riders.
fn node_gone(
    node: &NodeId,
    incarnation: Incarnation,
    matcher: &Addr<Matcher>,
    registry: &DriverRegistry,
) {
    matcher.do_send(NodeGone { node: node.clone() });
    registry.holder_node_gone(node, incarnation);
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
                crate::metrics::cluster_received(0, 1);
                matcher.do_send(RemoteDriver { node, driver, at });
            }
        }
        Wire::Drivers { node, changes } => {
            if node != cluster.node {
                crate::metrics::cluster_received(0, changes.len() as u64);
                matcher.do_send(RemoteDrivers { node, changes });
            }
        }
        Wire::Attached { node, driver } => {
            if node != cluster.node {
                if let Some(actor) = registry.get(&driver) {
                    actor.do_send(ConnectedElsewhere { node });
                }
            }
        }
        Wire::Wound(wound) => {
            if wound.from != cluster.node {
                matcher.do_send(Wounded(wound));
            }
        }
        Wire::TripBooked { node, driver } => {
            if node != cluster.node {
                if let Some(actor) = registry.get(&driver) {
                    actor.do_send(LookUpTrip);
                }
            }
        }
        Wire::Lock {
            from,
            incarnation,
            driver,
            offer_id,
            search,
            rider_id,
            request_id,
            pickup,
            timeout_ms,
            search_left_ms,
            search_deadline_unix_ms,
            group,
        } => {
            let now = Instant::now();
            let not_after = now + search_left(search_left_ms, search_deadline_unix_ms);
            let holder = OfferHolder {
                search,
                rider_id,
                request_id,
                pickup,
                first_offer_since: None,
                node: Some(from.clone()),
                incarnation,
                // A hold lasts no longer than the search plus its margin, by
                // the same clock-capped deadline: a message late on its way
                // does not stretch it.
                group: group.map(|g| GroupTag {
                    request_id: g.request_id,
                    size: g.size,
                    hold_until: (now + Duration::from_millis(g.hold_ms))
                        .min(not_after + crate::core::search::HOLD_MARGIN),
                }),
            };
            let request = LockRequest {
                offer_id,
                holder,
                timeout: Duration::from_millis(timeout_ms),
                not_after,
                reply: ReplyTo::Node(from.clone()),
            };
            let route = ReplyRoute::Node(cluster.clone(), from);
            // Not connected here (any more): the request's drop refuses.
            let message = TryLock::new(driver.clone(), request, route);
            // Not connected here (any more): the request's drop refuses.
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
            why,
        } => {
            // Not connected here (any more): nothing to withdraw.
            let cancel = ToDriver::Cancel(CancelOffer {
                offer_id,
                fencing_token,
                why: why.unwrap_or(crate::core::lock::Ending::RiderCancelled),
            });
            registry.send(&driver, cancel);
        }
        Wire::Held {
            driver,
            at,
            offer_id,
            fencing_token,
            search,
            rider_id,
            request_id,
        } => matcher.do_send(OfferHeld(
            OfferOutcome {
                driver_id: driver,
                driver_location: at,
                offer_id,
                search,
                rider_id,
                request_id,
                ending: crate::core::lock::Ending::Accepted,
                trip_id: None,
            },
            fencing_token,
        )),
        Wire::GroupNews {
            driver,
            offer_id,
            fencing_token,
            accepted,
            trip_id,
        } => {
            // Not connected here (any more): its hold runs out and is
            // settled, which finds the trip if the group was booked.
            let news = GroupNews {
                offer_id,
                fencing_token,
                accepted,
                trip_id,
            };
            registry.send(&driver, ToDriver::Group(news));
        }
    }
}

/// How long a search that asked for a lock goes on looking, counted from
/// now: what it said was left when it sent, cut to its wall-clock deadline
/// if the message was late on its way.
fn search_left(left_ms: u64, deadline_unix_ms: Option<u64>) -> Duration {
    let by_clock = deadline_unix_ms
        .zip(crate::limits::unix_ms())
        .map(|(deadline, now)| deadline.saturating_sub(now));
    Duration::from_millis(by_clock.map_or(left_ms, |clock| clock.min(left_ms)))
}
