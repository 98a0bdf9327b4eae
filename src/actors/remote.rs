//! What the cluster's listener tells the matcher about other nodes: their
//! drivers' availability (one change, a batch, or a whole node's at a
//! subscription), which nodes are alive, and older groups asking for a
//! younger group's driver; and Redis's verdict on booking a group. Each
//! becomes one decision of the search machine.

use actix::prelude::*;

use super::matcher::Matcher;
use crate::cluster::wire::{NodeId, Wound};
use crate::core::search::SearchKey;
use crate::location::LatLon;
use crate::protocol::DriverId;

/// Cluster mode: a driver on another node is offerable at `at`, or (`None`)
/// no longer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteDriver {
    /// The driver's node.
    pub node: NodeId,
    /// The driver.
    pub driver: DriverId,
    /// Where, while offerable.
    pub at: Option<LatLon>,
}

/// Cluster mode: several drivers of another node changed, in order (one
/// batch of announcements).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteDrivers {
    /// The drivers' node.
    pub node: NodeId,
    /// Each driver and where it is offerable (`None`: not any more).
    pub changes: Vec<(DriverId, Option<LatLon>)>,
}

/// Cluster mode: every offerable driver of another node, replacing what this
/// node had for it (sent when the subscription to Redis starts).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteSnapshot {
    /// The node.
    pub node: NodeId,
    /// Its offerable drivers.
    pub drivers: Vec<(DriverId, LatLon)>,
}

/// Cluster mode: a node left or died; its drivers are not offerable here
/// until they reconnect somewhere.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NodeGone {
    /// The node.
    pub node: NodeId,
}

/// Cluster mode: the nodes alive as a (re)subscription found them; remote
/// drivers of any other node are forgotten.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LiveNodes {
    /// The live nodes, this one aside.
    pub nodes: Vec<NodeId>,
}

impl Handler<RemoteDriver> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: RemoteDriver, ctx: &mut Context<Self>) {
        self.decide(ctx, |searches, now| {
            searches.remote_driver(now, msg.node, msg.driver, msg.at)
        });
    }
}

impl Handler<RemoteDrivers> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: RemoteDrivers, ctx: &mut Context<Self>) {
        let RemoteDrivers { node, changes } = msg;
        self.decide(ctx, |searches, now| {
            for (driver, at) in changes {
                searches.remote_driver(now, node.clone(), driver, at);
            }
        });
    }
}

impl Handler<RemoteSnapshot> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: RemoteSnapshot, ctx: &mut Context<Self>) {
        self.decide(ctx, |searches, now| {
            searches.remote_snapshot(now, msg.node, msg.drivers)
        });
    }
}

impl Handler<NodeGone> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: NodeGone, ctx: &mut Context<Self>) {
        self.decide(ctx, |searches, now| searches.node_gone(now, msg.node));
    }
}

impl Handler<LiveNodes> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: LiveNodes, ctx: &mut Context<Self>) {
        self.decide(ctx, |searches, now| searches.live_nodes(now, msg.nodes));
    }
}

/// Cluster mode: an older group on another node asks for a younger
/// group's driver (see `core::search::wound`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Wounded(pub Wound);

impl Handler<Wounded> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: Wounded, ctx: &mut Context<Self>) {
        let Wound {
            from,
            started_unix_ms,
            pickup,
            radius_m,
        } = msg.0;
        // Ages compare by the wall clock: without one, nothing is taken.
        let Some(unix_now_ms) = crate::limits::unix_ms() else {
            return;
        };
        self.decide(ctx, |searches, now| {
            searches.wounded(now, unix_now_ms, &from, started_unix_ms, pickup, radius_m)
        });
    }
}

/// Cluster mode: Redis's verdict on booking a group (the try it answers).
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct GroupConfirmed {
    pub(super) group: SearchKey,
    pub(super) attempt: u32,
    pub(super) verdict: Option<bool>,
}

impl Handler<GroupConfirmed> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: GroupConfirmed, ctx: &mut Context<Self>) {
        self.decide(ctx, |searches, now| {
            searches.group_confirmed(now, msg.group, msg.attempt, msg.verdict)
        });
    }
}
