//! The driver actors of this node, by driver id: found or created on
//! connect, spread over the actix arbiters, and the way the matcher and the
//! cluster listener reach a driver ([`DriverDirectory`]).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use actix::ArbiterHandle;

use super::driver::{Attach, DriverActor, HolderNodeGone, Retired};
use super::messages::{DriverDirectory, MatcherLink, ToDriver};
use crate::areas::ServiceAreas;
use crate::cluster::wire::NodeId;
use crate::cluster::Cluster;
use crate::core::Incarnation;
use crate::ids::Ids;
use crate::ops::OpsFeed;
use crate::protocol::DriverId;
use crate::session::Outbox;

/// Number of independently locked shards of the registry map, so that
/// connects on different threads rarely wait for one another.
const REGISTRY_SHARDS: usize = 16;

type Shard = Mutex<HashMap<DriverId, Addr<DriverActor>>>;

/// Finds or creates a driver's actor. The map only holds addresses; the
/// drivers' state lives in the actors.
pub struct DriverRegistry {
    shards: Vec<Shard>,
    hasher: RandomState,
    arbiters: Vec<ArbiterHandle>,
    pub(super) link: MatcherLink,
    pub(super) ids: Arc<Ids>,
    pub(super) cluster: Option<Arc<Cluster>>,
    pub(super) location_max_age: Duration,
    /// The areas served, if not everywhere.
    pub(super) areas: Option<Arc<ServiceAreas>>,
    /// Where the actors show themselves on the ops map.
    pub(super) ops: Arc<OpsFeed>,
}

impl DriverRegistry {
    /// A registry that starts driver actors round the given arbiters; with
    /// `cluster`, their locks are taken in Redis. Drivers are offered only
    /// while their last location is at most `location_max_age` old, and
    /// (with `areas`) inside the areas served.
    pub fn new(
        arbiters: Vec<ArbiterHandle>,
        link: MatcherLink,
        ids: Arc<Ids>,
        cluster: Option<Arc<Cluster>>,
        location_max_age: Duration,
        areas: Option<Arc<ServiceAreas>>,
        ops: Arc<OpsFeed>,
    ) -> Arc<Self> {
        assert!(
            !arbiters.is_empty(),
            "driver actors need at least one arbiter"
        );
        Arc::new(DriverRegistry {
            shards: (0..REGISTRY_SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            arbiters,
            link,
            ids,
            cluster,
            location_max_age,
            areas,
            ops,
        })
    }

    fn shard(&self, id: &DriverId) -> (usize, &Shard) {
        let hash = self.hasher.hash_one(id) as usize;
        (hash, &self.shards[hash % REGISTRY_SHARDS])
    }

    /// Attaches a new connection to the driver's actor, creating the actor if
    /// there is none. A driver keeps one actor however often it reconnects.
    pub async fn attach(
        self: &Arc<Self>,
        id: DriverId,
        session: u64,
        outbox: Outbox,
    ) -> Addr<DriverActor> {
        loop {
            let addr = {
                let (hash, shard) = self.shard(&id);
                // Poisoning would mean a panic while holding this short lock;
                // the map itself is still consistent, so carry on with it.
                let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
                map.entry(id.clone())
                    .or_insert_with(|| {
                        let arbiter = &self.arbiters[(hash >> 8) % self.arbiters.len()];
                        let (id, registry) = (id.clone(), self.clone());
                        DriverActor::start_in_arbiter(arbiter, move |_| {
                            DriverActor::new(id, registry)
                        })
                    })
                    .clone()
            };
            let attach = Attach {
                session,
                outbox: outbox.clone(),
            };
            match addr.send(attach).await {
                Ok(Ok(())) => return addr,
                // The actor retired between the look-up and the attach; it has
                // taken itself out of the map, so the next round makes a new one.
                Ok(Err(Retired)) | Err(_) => self.forget(&id, &addr),
            }
        }
    }

    /// The actor of a driver connected to this node (or lately connected),
    /// without creating one.
    pub fn get(&self, id: &DriverId) -> Option<Addr<DriverActor>> {
        let (_, shard) = self.shard(id);
        let map = shard.lock().unwrap_or_else(|e| e.into_inner());
        map.get(id).cloned()
    }

    /// Tells every driver actor that `node` is gone (see [`HolderNodeGone`]).
    /// O(drivers), for a rare event.
    pub fn holder_node_gone(&self, node: &NodeId, incarnation: Incarnation) {
        for shard in &self.shards {
            let map = shard.lock().unwrap_or_else(|e| e.into_inner());
            for actor in map.values() {
                actor.do_send(HolderNodeGone {
                    node: node.clone(),
                    incarnation,
                });
            }
        }
    }

    /// Drops `id` from the map if it still points at `addr`.
    pub(super) fn forget(&self, id: &DriverId, addr: &Addr<DriverActor>) {
        let (_, shard) = self.shard(id);
        let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(id) == Some(addr) {
            map.remove(id);
        }
    }

    /// Number of driver actors alive.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Whether no driver actor is alive.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl DriverDirectory for DriverRegistry {
    fn send(&self, driver: &DriverId, message: ToDriver) -> bool {
        // No actor here: a lock request is refused as it drops.
        let Some(actor) = self.get(driver) else {
            return false;
        };
        match message {
            ToDriver::Lock(request) => actor.do_send(request),
            // A stopped actor's mailbox is closed: that is news too.
            ToDriver::Cancel(cancel) => match actor.try_send(cancel) {
                Ok(()) => {}
                Err(actix::prelude::SendError::Full(cancel)) => actor.do_send(cancel),
                Err(actix::prelude::SendError::Closed(_)) => return false,
            },
            // A commit must not be lost to a full mailbox either.
            ToDriver::Group(news) => match actor.try_send(news) {
                Ok(()) => {}
                Err(actix::prelude::SendError::Full(news)) => actor.do_send(news),
                Err(actix::prelude::SendError::Closed(_)) => return false,
            },
            ToDriver::LookUpTrip => actor.do_send(super::driver::LookUpTrip),
        }
        true
    }
}
