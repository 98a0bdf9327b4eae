//! The publisher: this node's messages, announcements and liveness, written
//! to every server.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{drivers_key, encode_at, run_pipe, ALIVE_REFRESH, ALIVE_TTL, NODES_KEY};
use crate::cluster::store::alive_key;
use crate::cluster::wire::{node_channel, NodeId, Wire, DRIVERS_CHANNEL};
use crate::cluster::{Cluster, Outgoing};
use crate::location::LatLon;
use crate::protocol::DriverId;

/// How long drivers' changes wait to be published together. A node's
/// announcements are read by every other node, and a message costs each of
/// them far more than one more change in it does; 50 ms is little beside a
/// driver's 4 s between locations, and offers, answers and outcomes never
/// wait for it (they go at once, taking the changes waiting with them).
const ANNOUNCE_BATCH: Duration = Duration::from_millis(50);
/// Most changes in one message (a few tens of kilobytes).
const CHANGES_PER_MESSAGE: usize = 500;

/// The publisher task.
pub(super) async fn publish(
    cluster: Arc<Cluster>,
    mut directed: mpsc::UnboundedReceiver<Outgoing>,
) {
    // This node's offerable drivers, for servers that lost them.
    let mut own: HashMap<DriverId, LatLon> = HashMap::new();
    let mut alive = tokio::time::interval(ALIVE_REFRESH);
    alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the changes waiting are published, unless a message goes first.
    let mut flush_at: Option<Instant> = None;
    loop {
        let mut messages = Vec::new();
        tokio::select! {
            message = directed.recv() => match message {
                Some(message) => messages.push(message),
                None => return,
            },
            _ = cluster.announced.notified(), if flush_at.is_none() => {
                flush_at = Some(Instant::now() + ANNOUNCE_BATCH);
                continue;
            }
            _ = sleep_until_some(flush_at), if flush_at.is_some() => {}
            _ = alive.tick() => {
                tracing::trace!("refreshing liveness");
                refresh_alive(&cluster, &own).await;
                continue;
            }
        }
        flush_at = None;
        while let Ok(message) = directed.try_recv() {
            messages.push(message);
        }
        let changes = cluster.take_pending();
        if changes.is_empty() && messages.is_empty() {
            continue;
        }
        for (driver, at) in &changes {
            match at {
                Some(at) => own.insert(driver.clone(), *at),
                None => own.remove(driver),
            };
        }
        let mut pipe = redis::pipe();
        announce(&mut pipe, &cluster.node, &changes);
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

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Adds `changes` of `node`'s drivers to `pipe`, in order: the node's
/// drivers hash (for nodes that join later) and one message per
/// [`CHANGES_PER_MESSAGE`] on the drivers channel.
fn announce(pipe: &mut redis::Pipeline, node: &NodeId, changes: &[(DriverId, Option<LatLon>)]) {
    for chunk in changes.chunks(CHANGES_PER_MESSAGE) {
        let (placed, gone): (Vec<_>, Vec<_>) = chunk.iter().partition(|(_, at)| at.is_some());
        if !placed.is_empty() {
            let hset = pipe.cmd("HSET").arg(drivers_key(node));
            for (driver, at) in &placed {
                if let Some(at) = at {
                    hset.arg(&**driver).arg(encode_at(*at));
                }
            }
            hset.ignore();
        }
        if !gone.is_empty() {
            let hdel = pipe.cmd("HDEL").arg(drivers_key(node));
            for (driver, _) in &gone {
                hdel.arg(&**driver);
            }
            hdel.ignore();
        }
        let wire = Wire::Drivers {
            node: node.clone(),
            changes: chunk.to_vec(),
        };
        publish_cmd(pipe, DRIVERS_CHANNEL, &wire);
    }
}

fn publish_cmd(pipe: &mut redis::Pipeline, channel: &str, wire: &Wire) {
    let payload = serde_json::to_string(wire).expect("wire messages serialize");
    pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
}

/// Keeps this node's liveness key alive on every server, holding this
/// process's incarnation. A server where the key was missing (restarted
/// empty, or this node was paused past the key's life) or held another
/// process's (this node restarted: what the old process announced is stale)
/// gets this node's drivers again, republished so that listeners learn them.
async fn refresh_alive(cluster: &Cluster, own: &HashMap<DriverId, LatLon>) {
    let node = &cluster.node;
    let incarnation = cluster.incarnation.to_string();
    join_all(cluster.locks.server_list().iter().map(|server| {
        let incarnation = &incarnation;
        async move {
            let mut connection = server.connection();
            // Listed on every refresh too: a node taken for dead by a slow
            // check lists itself again.
            let mut refresh = redis::pipe();
            refresh
                .cmd("SET")
                .arg(alive_key(node))
                .arg(incarnation)
                .arg("PX")
                .arg(ALIVE_TTL.as_millis() as u64)
                .arg("GET")
                .cmd("SADD")
                .arg(NODES_KEY)
                .arg(&**node)
                .ignore();
            let kept = tokio::time::timeout(
                server.timeout(),
                refresh.query_async::<(Option<String>,)>(&mut connection),
            )
            .await;
            match &kept {
                Ok(Ok((Some(old),))) if old == incarnation => return, // kept alive
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return tracing::debug!(server = server.url(), "liveness refresh failed: {e}")
                }
                Err(_) => {
                    return tracing::debug!(server = server.url(), "liveness refresh timed out")
                }
            }
            let mut pipe = redis::pipe();
            pipe.cmd("DEL").arg(drivers_key(node)).ignore();
            let all: Vec<_> = own.iter().map(|(d, at)| (d.clone(), Some(*at))).collect();
            announce(&mut pipe, node, &all);
            if run_pipe(server, pipe).await {
                tracing::info!(
                    server = server.url(),
                    drivers = own.len(),
                    "announced this node"
                );
            }
        }
    }))
    .await;
}
