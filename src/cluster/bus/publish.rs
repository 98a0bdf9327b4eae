//! The publisher: this node's messages, announcements and liveness, written
//! to every server.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::join_all;
use tokio::sync::mpsc;

use super::{drivers_key, encode_at, run_pipe, ALIVE_REFRESH, ALIVE_TTL, NODES_KEY};
use crate::cluster::store::alive_key;
use crate::cluster::wire::{node_channel, Wire, DRIVERS_CHANNEL};
use crate::cluster::{Cluster, Outgoing};
use crate::location::LatLon;
use crate::protocol::DriverId;

/// The publisher task.
pub(super) async fn publish(
    cluster: Arc<Cluster>,
    mut directed: mpsc::UnboundedReceiver<Outgoing>,
) {
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
        }
    }))
    .await;
}
