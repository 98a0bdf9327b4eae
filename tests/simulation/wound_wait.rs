//! Starvation freedom for group requests: with enough drivers in reach for
//! it, the oldest group completes.
//!
//! One node's matcher and driver machines in virtual time, several group
//! requests competing for a few drivers that come online at random times,
//! at random distances (some beyond the first radius), accept after random
//! delays and finish their trips after a while. Messages travel with random
//! delays, in order on each channel but not across channels (as in the
//! engine, where availability changes reach the matcher another way than
//! offer outcomes). Whatever the interleaving, the oldest group, asking for
//! no more vehicles than there are drivers, must end `matched`; every group
//! ends exactly once, never partly matched, and nothing is left held.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ridelock::core::booking::{Booking, DriverEffect, DriverEvent, LockRequest, ReplyTo};
use ridelock::core::lock::{Ending, LockState};
use ridelock::core::search::{
    Dispatch, LockAnswer, OfferOutcome, SearchEffect, SearchSettings, Searches,
};
use ridelock::ids::Ids;
use ridelock::location::LatLon;
use ridelock::protocol::{DriverCommand, ServerMessage};

const SEEDS: u64 = 400;

fn pickup() -> LatLon {
    LatLon::new(52.52, 13.405).unwrap()
}

fn settings() -> SearchSettings {
    SearchSettings {
        radius_m: 1_000.0,
        radius_step_m: 1_000.0,
        radius_step: Duration::from_secs(2),
        max_radius_m: 3_000.0,
        max_candidates: 50,
        search_timeout: Duration::from_secs(40),
        offer_timeout: Duration::from_secs(5),
        max_requests_per_rider: 4,
        max_searches: 100,
        lock_margin: Duration::from_secs(1),
        dispatch: Dispatch::Greedy,
    }
}

enum Msg {
    Answer(LockAnswer),
    Ended(OfferOutcome),
    Held(OfferOutcome, u64),
    Changed(usize, Option<LatLon>),
    Request { rider: u32, size: u8, at: LatLon },
    MatcherTick,
    Driver(usize, DriverEvent),
    App(usize, ServerMessage),
}

/// Channels (sender, receiver) keep their order.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Channel {
    ToMatcher(usize),
    Changes(usize),
    ToDriver(usize),
    ToApp(usize),
    FromApp(usize),
    Timer,
}

struct Run {
    rng: StdRng,
    now: Instant,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    messages: HashMap<u64, Msg>,
    next: u64,
    last_on: HashMap<Channel, Instant>,
    searches: Searches<u32>,
    drivers: Vec<Booking>,
    session: HashMap<usize, u64>,
    /// Finals per rider.
    finals: BTreeMap<u32, Vec<ServerMessage>>,
    sizes: BTreeMap<u32, u8>,
    /// Timers already set (one per machine is enough).
    ticks: HashMap<Option<usize>, Instant>,
    preemptions: u64,
}

impl Run {
    fn send(&mut self, channel: Channel, delay: Duration, msg: Msg) {
        let mut at = self.now + delay;
        if channel != Channel::Timer {
            at += Duration::from_micros(self.rng.random_range(0..30_000));
            // In order on its channel.
            if let Some(&last) = self.last_on.get(&channel) {
                at = at.max(last);
            }
            self.last_on.insert(channel, at);
        }
        self.next += 1;
        self.queue.push(Reverse((at, self.next)));
        self.messages.insert(self.next, msg);
    }

    /// Wakes machine `who` (the matcher: `None`) at `at`, unless it is
    /// woken earlier already.
    fn tick_at(&mut self, who: Option<usize>, at: Instant) {
        if self
            .ticks
            .get(&who)
            .is_some_and(|&t| t > self.now && t <= at)
        {
            return;
        }
        self.ticks.insert(who, at);
        let delay = at.saturating_duration_since(self.now);
        let msg = match who {
            None => Msg::MatcherTick,
            Some(d) => Msg::Driver(d, DriverEvent::Tick),
        };
        self.send(Channel::Timer, delay, msg);
    }

    fn tell_driver(&mut self, d: usize, event: DriverEvent) {
        self.send(Channel::ToDriver(d), Duration::ZERO, Msg::Driver(d, event));
    }

    fn matcher_effects(&mut self) {
        for effect in self.searches.take_effects() {
            match effect {
                SearchEffect::Tell { to, message } => {
                    if message.is_final() {
                        self.finals.entry(to).or_default().push(message);
                    }
                }
                SearchEffect::Lock {
                    driver,
                    offer_id,
                    holder,
                    timeout,
                    not_after,
                    ..
                } => {
                    let d = index(&driver);
                    let request = LockRequest {
                        offer_id,
                        holder,
                        timeout,
                        not_after,
                        reply: ReplyTo::Matcher,
                    };
                    self.tell_driver(d, DriverEvent::TryLock(request));
                }
                SearchEffect::Cancel {
                    driver,
                    offer_id,
                    fencing_token,
                    why,
                    ..
                } => {
                    self.preemptions += u64::from(why == Ending::Preempted);
                    let event = DriverEvent::CancelOffer {
                        offer_id,
                        fencing_token,
                        why,
                    };
                    self.tell_driver(index(&driver), event);
                }
                SearchEffect::GroupNews {
                    driver,
                    node: _,
                    offer_id,
                    fencing_token,
                    accepted,
                    trip_id,
                } => {
                    let event = DriverEvent::group_news(offer_id, fencing_token, accepted, trip_id);
                    self.tell_driver(index(&driver), event);
                }
                SearchEffect::Settle { .. }
                | SearchEffect::ConfirmGroup { .. }
                | SearchEffect::Wound { .. }
                | SearchEffect::TripBooked { .. } => {
                    panic!("no Redis on one node")
                }
            }
        }
        if let Some(at) = self.searches.next_timeout() {
            self.tick_at(None, at);
        }
    }

    fn driver_event(&mut self, d: usize, event: DriverEvent) {
        self.drivers[d].handle(self.now, event);
        for effect in self.drivers[d].take_effects() {
            match effect {
                DriverEffect::Tell(message) => {
                    self.send(Channel::ToApp(d), Duration::ZERO, Msg::App(d, message))
                }
                DriverEffect::Answer { answer, .. } => {
                    self.send(Channel::ToMatcher(d), Duration::ZERO, Msg::Answer(answer))
                }
                DriverEffect::Ended { outcome, .. } => {
                    self.send(Channel::ToMatcher(d), Duration::ZERO, Msg::Ended(outcome))
                }
                DriverEffect::Held(outcome, token, _) => self.send(
                    Channel::ToMatcher(d),
                    Duration::ZERO,
                    Msg::Held(outcome, token),
                ),
                DriverEffect::Indexed { at, .. } => {
                    self.send(Channel::Changes(d), Duration::ZERO, Msg::Changed(d, at))
                }
                _ => {}
            }
        }
        if let Some(at) = self.drivers[d].next_timeout() {
            self.tick_at(Some(d), at);
        }
    }

    fn command(&mut self, d: usize, delay: Duration, command: DriverCommand) {
        let session = self.session[&d];
        let event = DriverEvent::Command { session, command };
        self.send(Channel::FromApp(d), delay, Msg::Driver(d, event));
    }

    /// The driver's app: accepts every offer after a while, finishes every
    /// trip after a while.
    fn app(&mut self, d: usize, message: ServerMessage) {
        match message {
            ServerMessage::Offer { offer_id, .. } => {
                let think = Duration::from_millis(self.rng.random_range(50..1_500));
                let command = DriverCommand::Accept {
                    offer_id,
                    fencing_token: None,
                };
                self.command(d, think, command);
            }
            ServerMessage::TripAssigned { trip_id, .. } => {
                let drive = Duration::from_millis(self.rng.random_range(1_000..8_000));
                self.command(d, drive, DriverCommand::TripCompleted { trip_id });
            }
            _ => {}
        }
    }
}

fn index(driver: &str) -> usize {
    driver[1..].parse().expect("d<n>")
}

/// `metres` from the pickup, towards `bearing_deg`.
fn around(metres: f64, bearing_deg: f64) -> LatLon {
    let (sin, cos) = bearing_deg.to_radians().sin_cos();
    let lat = 52.52 + metres * cos / 111_195.0;
    let lon = 13.405 + metres * sin / (111_195.0 * 52.52f64.to_radians().cos());
    LatLon::new(lat, lon).unwrap()
}

/// One seed; how many drivers older groups took from younger ones.
fn run(seed: u64) -> Result<u64, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let t0 = Instant::now();
    let ids = Arc::new(Ids::default());
    let drivers = rng.random_range(3..=6usize);
    let groups = rng.random_range(2..=4u32);
    let mut run = Run {
        rng: StdRng::seed_from_u64(seed ^ 0x5EED),
        now: t0,
        queue: BinaryHeap::new(),
        messages: HashMap::new(),
        next: 0,
        last_on: HashMap::new(),
        searches: Searches::new(settings(), ids.clone(), None),
        drivers: (0..drivers)
            .map(|d| {
                Booking::new(
                    format!("d{d}").into(),
                    ids.clone(),
                    None,
                    Duration::from_secs(600),
                )
            })
            .collect(),
        session: HashMap::new(),
        finals: BTreeMap::new(),
        sizes: BTreeMap::new(),
        ticks: HashMap::new(),
        preemptions: 0,
    };
    for d in 0..drivers {
        let online = Duration::from_millis(rng.random_range(0..3_000));
        let at = around(
            rng.random_range(100.0..2_500.0),
            rng.random_range(0.0..360.0),
        );
        let session = d as u64 + 1;
        run.session.insert(d, session);
        run.send(
            Channel::FromApp(d),
            online,
            Msg::Driver(d, DriverEvent::Attach { session }),
        );
        let location = DriverCommand::Location {
            lat: at.lat,
            lon: at.lon,
        };
        run.command(d, online, location);
        run.command(d, online, DriverCommand::Available);
    }
    // Requests a few milliseconds apart, in rider order: rider 0 is the
    // oldest, asks for no more vehicles than there are drivers, and waits
    // where every driver is in its widest reach (but not all in its
    // first); the younger ones wait anywhere nearby, often nearer the
    // drivers than the oldest one.
    for rider in 0..groups {
        let size = rng.random_range(2..=4u8.min(drivers as u8));
        run.sizes.insert(rider, size);
        let when = Duration::from_millis(u64::from(rider) * rng.random_range(1..400));
        let at = match rider {
            0 => pickup(),
            _ => around(rng.random_range(0.0..2_000.0), rng.random_range(0.0..360.0)),
        };
        run.send(Channel::Timer, when, Msg::Request { rider, size, at });
    }
    let end = t0 + Duration::from_secs(120);
    while let Some(Reverse((at, id))) = run.queue.pop() {
        if at > end {
            break;
        }
        run.now = run.now.max(at);
        let now = run.now;
        match run.messages.remove(&id).expect("queued") {
            Msg::Answer(answer) => run.searches.lock_answered(now, answer),
            Msg::Ended(outcome) => run.searches.offer_ended(now, outcome),
            Msg::Held(outcome, token) => run.searches.offer_held(now, outcome, token),
            Msg::Changed(d, at) => run.searches.driver_changed(now, format!("d{d}").into(), at),
            Msg::Request { rider, size, at } => {
                let request = (format!("r{rider}").into(), 1, "g".into(), at, now);
                run.searches.request_vehicles(now, rider, request, size);
            }
            Msg::MatcherTick => run.searches.tick(now),
            Msg::Driver(d, event) => {
                run.driver_event(d, event);
                // A group never holds more drivers than it asked for.
                let mut holding: HashMap<&str, u8> = HashMap::new();
                for booking in &run.drivers {
                    if let Some(offer) = booking.lock().current_offer() {
                        *holding.entry(&offer.holder.rider_id).or_default() += 1;
                    }
                }
                for (rider, n) in holding {
                    let size = run.sizes[&rider[1..].parse::<u32>().expect("r<n>")];
                    if n > size {
                        return Err(format!("{rider} holds {n} drivers for {size} vehicles"));
                    }
                }
                continue;
            }
            Msg::App(d, message) => {
                run.app(d, message);
                continue;
            }
        }
        run.matcher_effects();
    }

    for (rider, size) in &run.sizes {
        let finals = run.finals.get(rider).map_or(&[][..], Vec::as_slice);
        match finals {
            [ServerMessage::Matched { drivers, .. }] => {
                if drivers.len() != usize::from(*size) {
                    return Err(format!("r{rider} matched with {drivers:?} for {size}"));
                }
            }
            [ServerMessage::NoDriver { .. }] if *rider != 0 => {}
            other => {
                return Err(format!(
                    "r{rider} ({size} vehicles, {} drivers) ended {other:?}",
                    run.drivers.len()
                ))
            }
        }
    }
    if run.searches.counts().searches != 0 {
        return Err("searches left".into());
    }
    for (d, booking) in run.drivers.iter().enumerate() {
        if let LockState::Offered(_) | LockState::Held(_) = booking.lock().state() {
            return Err(format!("d{d} still held: {:?}", booking.lock().state()));
        }
    }
    Ok(run.preemptions)
}

#[test]
fn the_oldest_group_completes() {
    let mut preemptions = 0;
    for seed in 0..SEEDS {
        match run(seed) {
            Ok(taken) => preemptions += taken,
            Err(e) => panic!("seed {seed}: {e}"),
        }
    }
    // The runs must have needed the rule they check.
    assert!(preemptions > 0, "no older group ever took a driver");
    eprintln!("wound-wait: {SEEDS} seeds, {preemptions} drivers taken by older groups, the oldest group matched in every one");
}
