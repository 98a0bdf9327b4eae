//! Riders: either a person per request (connect, request, wait for the final
//! message, close), or a pool of connections each carrying many requests.
//! Both cancel some and record how each request ended.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use ridelock::auth::Role;
use ridelock::location::LatLon;
use ridelock::protocol::{RequestId, RiderCommand, ServerMessage};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::checker::Final;
use crate::net::Ws;
use crate::run::Shared;

/// Longest a cancelling rider waits before cancelling.
const LONGEST_CANCEL_DELAY: Duration = Duration::from_secs(2);

/// A ride request for a rider connection to send.
#[derive(Debug)]
pub struct Order {
    /// Unique across the run.
    pub request_id: String,
    /// Where to be picked up.
    pub pickup: LatLon,
    /// How many vehicles (1 for a plain request).
    pub vehicles: u8,
}

/// What the run tells rider connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Send what arrives.
    Running,
    /// Cancel everything still open; keep reading.
    Draining,
    /// Close.
    Stopped,
}

/// Runs rider connection `n`: sends orders as they arrive, reads outcomes.
pub async fn run(
    n: usize,
    shared: Arc<Shared>,
    mut orders: mpsc::Receiver<Order>,
    mut phase: watch::Receiver<Phase>,
) {
    let id = format!("sim-{}r{n}", shared.plan.id_prefix);
    let target = shared.target_for(shared.plan.drivers + n);
    let source = shared.source_for(target, shared.plan.drivers + n);
    let (path, token) = shared.credentials(Role::Rider, &id);
    let mut ws = match target.connect(&path, token.as_deref(), source).await {
        Ok(ws) => ws,
        Err(e) => return shared.stats.connect_failed(&e),
    };
    let mut rng = SmallRng::seed_from_u64(shared.plan.rider_seed() ^ (0xA5A5_0000 + n as u64));
    // Requests in flight on this connection: when each was sent.
    let mut open: HashMap<String, Instant> = HashMap::new();
    let mut cancels: Vec<(Instant, String)> = Vec::new();
    loop {
        let next_cancel = cancels.iter().map(|(at, _)| *at).min();
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            order = orders.recv(), if *phase.borrow() == Phase::Running => {
                let Some(order) = order else { continue };
                let now = Instant::now();
                shared
                    .stats
                    .request_sent(&order.request_id, order.vehicles, now);
                open.insert(order.request_id.clone(), now);
                if rng.random_bool(shared.plan.cancel_prob) {
                    let delay = LONGEST_CANCEL_DELAY.mul_f64(rng.random::<f64>());
                    cancels.push((now + delay, order.request_id.clone()));
                }
                let command = RiderCommand::RequestRide {
                    request_id: order.request_id.into(),
                    pickup: order.pickup,
                    vehicles: order.vehicles,
                };
                if send(&mut ws, &command).await.is_err() {
                    break;
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => on_message(&text, &id, &mut open, &shared),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            _ = tokio::time::sleep_until(next_cancel.unwrap_or(far)), if next_cancel.is_some() => {
                let now = Instant::now();
                let (due, later): (Vec<_>, Vec<_>) = cancels.drain(..).partition(|(at, _)| *at <= now);
                cancels = later;
                for (_, request_id) in due {
                    if open.contains_key(&request_id)
                        && send(&mut ws, &RiderCommand::Cancel { request_id: request_id.into() }).await.is_err()
                    {
                        break;
                    }
                }
            }
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() == Phase::Stopped {
                    break;
                }
                // Draining: withdraw what is still open, so that every request
                // is owed its final message within the drain period.
                cancels.clear();
                let ids: Vec<String> = open.keys().cloned().collect();
                for request_id in ids {
                    if send(&mut ws, &RiderCommand::Cancel { request_id: request_id.into() }).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    let _ = ws.close(None).await;
}

/// One person asking for one ride: connects as rider `sim-p{n}`, sends the
/// request, cancels it if they lose patience (or the run drains), and closes
/// once the final message is in. `_slot` is their place among the riders
/// connected at once.
pub async fn person(
    n: u64,
    order: Order,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
    _slot: OwnedSemaphorePermit,
) {
    let id = format!("sim-{}p{n}", shared.plan.id_prefix);
    let slot = n as usize % shared.person_slots_total.max(1);
    let index = shared.plan.drivers + slot;
    let target = shared.target_for(index);
    let source = shared.source_for(target, index);
    let (path, token) = shared.credentials(Role::Rider, &id);
    let mut ws = match target.connect(&path, token.as_deref(), source).await {
        Ok(ws) => ws,
        Err(e) => return shared.stats.connect_failed(&e),
    };
    let mut rng = SmallRng::seed_from_u64(shared.plan.rider_seed() ^ (0x5A5A_0000_0000 + n));
    let sent = Instant::now();
    shared
        .stats
        .request_sent(&order.request_id, order.vehicles, sent);
    let mut open = HashMap::from([(order.request_id.clone(), sent)]);
    let mut cancel_at = rng
        .random_bool(shared.plan.cancel_prob)
        .then(|| sent + LONGEST_CANCEL_DELAY.mul_f64(rng.random::<f64>()));
    let request_id: RequestId = order.request_id.into();
    let command = RiderCommand::RequestRide {
        request_id: request_id.clone(),
        pickup: order.pickup,
        vehicles: order.vehicles,
    };
    if send(&mut ws, &command).await.is_ok() {
        let cancel = RiderCommand::Cancel { request_id };
        while !open.is_empty() {
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(text))) => on_message(&text, &id, &mut open, &shared),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
                _ = tokio::time::sleep_until(cancel_at.unwrap_or(far)), if cancel_at.is_some() => {
                    cancel_at = None;
                    if send(&mut ws, &cancel).await.is_err() {
                        break;
                    }
                }
                changed = phase.changed() => {
                    if changed.is_err() || *phase.borrow() == Phase::Stopped {
                        break;
                    }
                    // Draining: withdraw, so the final message comes in time.
                    cancel_at = None;
                    if send(&mut ws, &cancel).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    let _ = ws.close(None).await;
}

async fn send(ws: &mut Ws, command: &RiderCommand) -> Result<(), ()> {
    let text = serde_json::to_string(command).map_err(|_| ())?;
    ws.send(Message::text(text)).await.map_err(|_| ())
}

fn on_message(text: &str, rider: &str, open: &mut HashMap<String, Instant>, shared: &Shared) {
    let stats = &shared.stats;
    let message: ServerMessage = match serde_json::from_str(text) {
        Ok(message) => message,
        Err(e) => return stats.violation(format!("rider {rider} got unparsable {text}: {e}")),
    };
    let (request_id, how) = match message {
        ServerMessage::Searching { request_id } => {
            stats.acknowledged.inc();
            stats.acknowledged_request(&request_id);
            return;
        }
        ServerMessage::GroupProgress { .. } => return,
        ServerMessage::Matched {
            request_id,
            drivers,
            ..
        } => {
            stats.matches.inc();
            for driver in &drivers {
                stats.pickup_distance.record(driver.distance_m);
            }
            if let Some(sent) = open.get(&*request_id) {
                let latency = if drivers.len() > 1 {
                    &stats.group_request_to_matched
                } else {
                    &stats.request_to_matched
                };
                latency.record(sent.elapsed());
            }
            if drivers.len() > 1 {
                stats.group_matches.inc();
            }
            let drivers = drivers.iter().map(|d| d.driver_id.to_string()).collect();
            (request_id, Final::Matched(drivers))
        }
        ServerMessage::NoDriver { request_id, .. } => {
            stats.no_driver.inc();
            (request_id, Final::NoDriver)
        }
        ServerMessage::Cancelled { request_id } => {
            stats.cancelled.inc();
            (request_id, Final::Cancelled)
        }
        ServerMessage::Error {
            code, request_id, ..
        } => {
            match (code.as_str(), request_id) {
                // A cancel that crossed the request's final message finds nothing.
                ("unknown_request", _) => {}
                // Refused at the door: the engine owes it nothing.
                ("overloaded" | "too_many_requests", Some(request_id)) => {
                    stats.rejected.inc();
                    open.remove(&*request_id);
                    stats.request_ended(&request_id);
                }
                _ => stats.rider_errors.inc(),
            }
            return;
        }
        other => {
            return stats.violation(format!("rider {rider} got a driver's message {other:?}"));
        }
    };
    open.remove(&*request_id);
    stats.request_ended(&request_id);
    if let Some(v) = stats.final_message(&request_id, how) {
        stats.violation(v);
    }
}
