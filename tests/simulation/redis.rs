//! A model of the lock servers: what each Lua script in
//! `src/cluster/store/scripts.rs` does to one server's keys, with expiry in virtual
//! time. A restart without persistence forgets everything.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ridelock::cluster::redlock::Renewal;
use ridelock::cluster::store::RECORD_TTL;
use ridelock::core::booking::{GroupMember, TripRecord, TRIP_HOLD};
use ridelock::core::lock::{FencingToken, TripId};

/// One script call on one server.
#[derive(Clone, Debug)]
pub enum ServerOp {
    Acquire {
        driver: String,
        owner: String,
        ttl: Duration,
        floor: FencingToken,
    },
    Release {
        driver: String,
        owner: String,
    },
    Confirm {
        driver: String,
        record: TripRecord,
    },
    Renew {
        driver: String,
        record: TripRecord,
        repair: bool,
    },
    Finish {
        driver: String,
        owner: String,
        trip_id: TripId,
    },
    Settle {
        driver: String,
        owner: String,
    },
    CurrentTrip {
        driver: String,
    },
    Hold {
        driver: String,
        owner: String,
        ttl: Duration,
        token: FencingToken,
    },
    ConfirmGroup {
        members: Vec<GroupMember>,
        keep: Duration,
    },
    /// A node's liveness key, set to its process's incarnation.
    Alive {
        node: String,
        ttl: Duration,
        incarnation: u64,
    },
    /// Whether a node's liveness key exists.
    IsAlive {
        node: String,
    },
}

/// A server's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum ServerReply {
    Token(Option<FencingToken>),
    Done(bool),
    Trip(Option<TripId>),
    Record(Option<TripRecord>),
    Incarnation(Option<u64>),
    Renewal(Renewal),
}

#[derive(Default)]
pub struct Server {
    pub up: bool,
    /// The instant the server's clock reads `EPOCH_US`.
    clock_base: Option<Instant>,
    fences: HashMap<String, FencingToken>,
    locks: HashMap<String, (String, Instant)>,
    tokens: HashMap<String, FencingToken>,
    settled: HashMap<String, Instant>,
    /// Owners whose trip was finished here: a renewal hears it.
    finished: HashMap<String, Instant>,
    trips: HashMap<String, (TripId, Instant)>,
    current: HashMap<String, (String, TripRecord, Instant)>,
    alive: HashMap<String, (u64, Instant)>,
}

fn live<V>(
    map: &HashMap<String, V>,
    key: &str,
    now: Instant,
    expiry: impl Fn(&V) -> Instant,
) -> bool {
    map.get(key).is_some_and(|v| expiry(v) > now)
}

impl Server {
    pub fn new(clock_base: Instant) -> Self {
        Server {
            up: true,
            clock_base: Some(clock_base),
            ..Server::default()
        }
    }

    /// A restart without persistence.
    pub fn wipe(&mut self) {
        *self = Server {
            up: self.up,
            clock_base: self.clock_base,
            ..Server::default()
        };
    }

    /// The server's clock in microseconds (what `TIME` says).
    fn clock_us(&self, now: Instant) -> u64 {
        const EPOCH_US: u64 = 1_800_000_000_000_000;
        EPOCH_US + (now - self.clock_base.expect("set")).as_micros() as u64
    }

    fn lock_owner(&self, driver: &str, now: Instant) -> Option<&str> {
        self.locks
            .get(driver)
            .filter(|(_, until)| *until > now)
            .map(|(owner, _)| owner.as_str())
    }

    /// Whether `owner` holds `driver`'s lock here (whether or not the
    /// server is up: a server that is down keeps its data).
    pub fn holds(&self, driver: &str, owner: &str, now: Instant) -> bool {
        self.lock_owner(driver, now) == Some(owner)
    }

    /// Whether `owner` was settled or finished here (its lock can't book).
    pub fn is_settled(&self, owner: &str, now: Instant) -> bool {
        live(&self.settled, owner, now, |at| *at)
    }

    /// The driver's current trip as recorded, whoever holds its lock.
    pub fn recorded_trip(&self, driver: &str, now: Instant) -> Option<TripRecord> {
        self.current
            .get(driver)
            .filter(|(_, _, until)| *until > now)
            .map(|(_, record, _)| record.clone())
    }

    /// Drivers whose lock is held at `now`.
    pub fn locked(&self, now: Instant) -> Vec<(String, String)> {
        self.locks
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(d, (o, _))| (d.clone(), o.clone()))
            .collect()
    }

    pub fn apply(&mut self, op: &ServerOp, now: Instant) -> ServerReply {
        match op {
            ServerOp::Acquire {
                driver,
                owner,
                ttl,
                floor,
            } => {
                if live(&self.settled, owner, now, |at| *at)
                    || self.lock_owner(driver, now).is_some()
                {
                    return ServerReply::Token(None);
                }
                self.locks.insert(
                    driver.clone(),
                    (owner.clone(), now + (*ttl).max(Duration::from_millis(1))),
                );
                let clock = self.clock_us(now);
                let token = self.tokens.entry(driver.clone()).or_insert(0);
                *token = (*token + 1).max(*floor + 1).max(clock);
                ServerReply::Token(Some(*token))
            }
            ServerOp::Release { driver, owner } => {
                if self.lock_owner(driver, now) == Some(owner.as_str()) {
                    self.locks.remove(driver);
                    return ServerReply::Done(true);
                }
                ServerReply::Done(false)
            }
            ServerOp::Confirm { driver, record } => {
                if self
                    .trips
                    .get(&record.owner)
                    .is_some_and(|(trip, until)| *trip == record.trip_id && *until > now)
                {
                    return ServerReply::Done(true);
                }
                let rider_alive = !record.rider_is_remote
                    || self
                        .alive
                        .get(&*record.rider_node)
                        .is_some_and(|(inc, until)| {
                            *until > now && *inc == record.rider_incarnation
                        });
                let fence = self.fences.get(driver).copied().unwrap_or(0);
                let ok = !live(&self.settled, &record.owner, now, |at| *at)
                    && rider_alive
                    && self.lock_owner(driver, now) == Some(record.owner.as_str())
                    && fence <= record.fencing_token;
                if ok {
                    self.fences.insert(driver.clone(), record.fencing_token);
                    self.trips
                        .insert(record.owner.clone(), (record.trip_id, now + RECORD_TTL));
                    self.locks.get_mut(driver).expect("held").1 = now + TRIP_HOLD;
                    self.current.insert(
                        driver.clone(),
                        (record.owner.clone(), record.clone(), now + TRIP_HOLD),
                    );
                }
                ServerReply::Done(ok)
            }
            ServerOp::Renew {
                driver,
                record,
                repair,
            } => {
                let owner = &record.owner;
                if live(&self.finished, owner, now, |at| *at) {
                    return ServerReply::Renewal(Renewal::Finished);
                }
                let holder = self.lock_owner(driver, now).map(str::to_string);
                let settled = live(&self.settled, owner, now, |at| *at);
                if holder.as_deref() == Some(owner.as_str())
                    || (holder.is_none() && *repair && !settled)
                {
                    self.locks
                        .insert(driver.clone(), (owner.clone(), now + TRIP_HOLD));
                    self.current.insert(
                        driver.clone(),
                        (owner.clone(), record.clone(), now + TRIP_HOLD),
                    );
                    self.trips
                        .insert(owner.clone(), (record.trip_id, now + RECORD_TTL));
                    return ServerReply::Renewal(Renewal::Kept);
                }
                ServerReply::Renewal(Renewal::Lost)
            }
            ServerOp::Finish {
                driver,
                owner,
                trip_id,
            } => {
                self.settled.insert(owner.clone(), now + RECORD_TTL);
                self.finished.insert(owner.clone(), now + RECORD_TTL);
                self.trips
                    .insert(owner.clone(), (*trip_id, now + RECORD_TTL));
                let freed = self.lock_owner(driver, now) == Some(owner.as_str());
                if freed {
                    self.locks.remove(driver);
                }
                if self
                    .current
                    .get(driver)
                    .is_some_and(|(o, _, until)| o == owner && *until > now)
                {
                    self.current.remove(driver);
                }
                ServerReply::Done(freed)
            }
            ServerOp::Settle { driver, owner } => {
                self.settled.insert(owner.clone(), now + RECORD_TTL);
                if let Some((trip, _)) = self.trips.get(owner).filter(|(_, until)| *until > now) {
                    return ServerReply::Trip(Some(*trip));
                }
                if self.lock_owner(driver, now) == Some(owner.as_str()) {
                    self.locks.remove(driver);
                }
                ServerReply::Trip(None)
            }
            ServerOp::CurrentTrip { driver } => {
                let held_by = self.lock_owner(driver, now).map(str::to_string);
                ServerReply::Record(
                    self.current
                        .get(driver)
                        .filter(|(owner, _, until)| {
                            *until > now && held_by.as_deref() == Some(owner)
                        })
                        .map(|(_, record, _)| record.clone()),
                )
            }
            ServerOp::Hold {
                driver,
                owner,
                ttl,
                token,
            } => {
                let fence = self.fences.get(driver).copied().unwrap_or(0);
                let ok = !live(&self.settled, owner, now, |at| *at)
                    && self.lock_owner(driver, now) == Some(owner.as_str())
                    && fence <= *token;
                if ok {
                    self.locks.get_mut(driver).expect("held").1 =
                        now + (*ttl).max(Duration::from_millis(1));
                }
                ServerReply::Done(ok)
            }
            ServerOp::ConfirmGroup { members, keep } => {
                let keep = (*keep).max(TRIP_HOLD);
                let landed = members.iter().all(|m| {
                    self.trips
                        .get(&m.trip.owner)
                        .is_some_and(|(trip, until)| *trip == m.trip.trip_id && *until > now)
                });
                if landed {
                    return ServerReply::Done(true);
                }
                let ok = members.iter().all(|m| {
                    let fence = self.fences.get(&*m.driver).copied().unwrap_or(0);
                    !live(&self.settled, &m.trip.owner, now, |at| *at)
                        && self.lock_owner(&m.driver, now) == Some(m.trip.owner.as_str())
                        && fence <= m.trip.fencing_token
                });
                if ok {
                    for GroupMember { driver, trip } in members {
                        let driver = driver.to_string();
                        self.fences.insert(driver.clone(), trip.fencing_token);
                        self.trips
                            .insert(trip.owner.clone(), (trip.trip_id, now + RECORD_TTL));
                        self.locks.get_mut(&driver).expect("held").1 = now + keep;
                        self.current
                            .insert(driver, (trip.owner.clone(), trip.clone(), now + keep));
                    }
                }
                ServerReply::Done(ok)
            }
            ServerOp::Alive {
                node,
                ttl,
                incarnation,
            } => {
                self.alive.insert(node.clone(), (*incarnation, now + *ttl));
                ServerReply::Done(true)
            }
            ServerOp::IsAlive { node } => ServerReply::Incarnation(
                self.alive
                    .get(node)
                    .filter(|(_, until)| *until > now)
                    .map(|(inc, _)| *inc),
            ),
        }
    }
}
