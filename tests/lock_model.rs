//! The lock rules of one driver against an independent model: random event
//! sequences (stale, equal and fresh fencing tokens; answers to the current
//! offer, to remembered and to unknown ones; losses and adopted trips; group
//! offers held, committed and let go) drive
//! both `DriverLock` and a small model written from docs/protocol.md, and
//! after every step they must agree on the state, the newest token, the
//! availability, every ending and every refusal.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use ridelock::location::LatLon;
use ridelock::lock::{
    AnswerError, Availability, DriverLock, Ended, Ending, LockRefused, LockState, Offer, OfferId,
    Trip,
};

/// Endings a driver remembers (docs/protocol.md: "its last 8 offers").
const REMEMBERED: usize = 8;

#[derive(Clone, Debug)]
enum TokenKind {
    /// Newer than any seen, by this much.
    Fresh(u64),
    /// The newest seen.
    Equal,
    /// Older than the newest seen, by this much.
    Stale(u64),
}

#[derive(Clone, Debug)]
enum Target {
    /// The offer held now (or, if none, the newest remembered).
    Current,
    /// An offer that ended earlier (the oldest remembered, or one forgotten).
    Old(usize),
    /// An offer this driver never had.
    Unknown,
}

#[derive(Clone, Debug)]
enum Event {
    Connect,
    Disconnect,
    WantsWork(bool),
    Locate,
    TryLock {
        token: TokenKind,
        ttl_ms: u64,
    },
    Accept(Target),
    Decline(Target),
    Advance(u64),
    /// To the held offer's deadline exactly, where answers stop counting.
    AdvanceToDeadline,
    Expire,
    Cancel {
        right_id: bool,
        right_token: bool,
        why: Ending,
    },
    /// The app accepts a group's offer: held until `ttl_ms` from now.
    Hold(Target, u64),
    /// The group completes: the held offer becomes a trip.
    Commit {
        right_token: bool,
    },
    Lose(Target),
    AdoptTrip {
        token: TokenKind,
    },
    CompleteTrip {
        right_trip: bool,
    },
}

fn token_kind() -> impl Strategy<Value = TokenKind> {
    prop_oneof![
        3 => (1u64..3).prop_map(TokenKind::Fresh),
        1 => Just(TokenKind::Equal),
        1 => (1u64..3).prop_map(TokenKind::Stale),
    ]
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        4 => Just(Target::Current),
        2 => (0usize..12).prop_map(Target::Old),
        1 => Just(Target::Unknown),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        2 => Just(Event::Connect),
        1 => Just(Event::Disconnect),
        2 => any::<bool>().prop_map(Event::WantsWork),
        1 => Just(Event::Locate),
        8 => (token_kind(), 0u64..200).prop_map(|(token, ttl_ms)| Event::TryLock { token, ttl_ms }),
        2 => target().prop_map(Event::Accept),
        4 => target().prop_map(Event::Decline),
        2 => (0u64..150).prop_map(Event::Advance),
        1 => Just(Event::AdvanceToDeadline),
        1 => Just(Event::Expire),
        1 => (any::<bool>(), any::<bool>(), prop_oneof![
                Just(Ending::RiderCancelled), Just(Ending::GroupIncomplete), Just(Ending::Preempted)
            ])
            .prop_map(|(right_id, right_token, why)| Event::Cancel { right_id, right_token, why }),
        2 => (target(), 0u64..400).prop_map(|(t, ttl)| Event::Hold(t, ttl)),
        2 => any::<bool>().prop_map(|right_token| Event::Commit { right_token }),
        1 => target().prop_map(Event::Lose),
        1 => token_kind().prop_map(|token| Event::AdoptTrip { token }),
        1 => any::<bool>().prop_map(|right_trip| Event::CompleteTrip { right_trip }),
    ]
}

/// What the driver is doing, in the model.
#[derive(Clone, Debug, PartialEq)]
enum Doing {
    Free,
    Offered {
        offer_id: OfferId,
        token: u64,
        deadline: Instant,
    },
    /// A group's offer accepted, held until `deadline`.
    Held {
        offer_id: OfferId,
        token: u64,
        deadline: Instant,
    },
    OnTrip {
        trip_id: u64,
    },
}

/// The rules, written again from the docs rather than from `DriverLock`.
#[derive(Debug)]
struct Model {
    connected: bool,
    wants_work: bool,
    located: bool,
    doing: Doing,
    newest: u64,
    remembered: VecDeque<(OfferId, Ending)>,
    /// Every offer id ever granted, oldest first.
    granted: Vec<OfferId>,
}

impl Model {
    fn availability(&self) -> Availability {
        match self.doing {
            Doing::Offered { .. } | Doing::Held { .. } => Availability::Offered,
            Doing::OnTrip { .. } => Availability::OnTrip,
            Doing::Free if self.connected && self.wants_work && self.located => {
                Availability::Available
            }
            Doing::Free => Availability::Offline,
        }
    }

    fn token(&self, kind: &TokenKind) -> u64 {
        match kind {
            TokenKind::Fresh(by) => self.newest + by,
            TokenKind::Equal => self.newest,
            TokenKind::Stale(by) => self.newest.saturating_sub(*by),
        }
    }

    fn target(&self, target: &Target) -> OfferId {
        match (target, &self.doing) {
            (Target::Current, Doing::Offered { offer_id, .. } | Doing::Held { offer_id, .. }) => {
                *offer_id
            }
            (Target::Current, _) => self.granted.last().copied().unwrap_or(999_999),
            (Target::Old(back), _) => self
                .granted
                .iter()
                .rev()
                .nth(*back)
                .copied()
                .unwrap_or(999_998),
            (Target::Unknown, _) => 999_997,
        }
    }

    /// Ends the offer with `ending`; the ended offer's id. A group hold is
    /// the driver's word: the driver's own doing (declining, going away)
    /// does not end it.
    fn end(&mut self, ending: Ending) -> Option<OfferId> {
        let offer_id = match self.doing {
            Doing::Offered { offer_id, .. } => offer_id,
            Doing::Held { offer_id, .. }
                if !matches!(ending, Ending::Declined | Ending::DriverDisconnected) =>
            {
                offer_id
            }
            _ => return None,
        };
        self.doing = Doing::Free;
        self.remember(offer_id, ending);
        Some(offer_id)
    }

    fn remember(&mut self, offer_id: OfferId, ending: Ending) {
        if self.remembered.len() == REMEMBERED {
            self.remembered.pop_front();
        }
        self.remembered.push_back((offer_id, ending));
    }

    fn ending_of(&self, offer_id: OfferId) -> Option<Ending> {
        self.remembered
            .iter()
            .find(|(id, _)| *id == offer_id)
            .map(|(_, e)| *e)
    }
}

/// The endings a step produced: (offer, how).
fn endings_of(ended: &[Ended<u32>]) -> Vec<(OfferId, Ending)> {
    ended.iter().map(|e| (e.offer.offer_id, e.ending)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn driver_lock_agrees_with_the_model(events in prop::collection::vec(event(), 1..250)) {
        let start = Instant::now();
        let mut now = start;
        let mut lock: DriverLock<u32> = DriverLock::new();
        let mut model = Model {
            connected: false,
            wants_work: false,
            located: false,
            doing: Doing::Free,
            newest: 0,
            remembered: VecDeque::new(),
            granted: Vec::new(),
        };
        let mut next_offer: OfferId = 1;
        let mut next_trip = 1u64;

        for event in events {
            // What the lock did, and what the model says it must do.
            let mut got: Vec<Ended<u32>> = Vec::new();
            let mut want: Vec<(OfferId, Ending)> = Vec::new();
            match &event {
                Event::Connect => {
                    lock.connect();
                    model.connected = true;
                }
                Event::Disconnect => {
                    got.extend(lock.disconnect());
                    model.connected = false;
                    model.wants_work = false;
                    want.extend(model.end(Ending::DriverDisconnected).map(|id| (id, Ending::DriverDisconnected)));
                }
                Event::WantsWork(w) => {
                    got.extend(lock.set_wants_work(*w));
                    model.wants_work = *w;
                    if !w {
                        want.extend(model.end(Ending::Declined).map(|id| (id, Ending::Declined)));
                    }
                }
                Event::Locate => {
                    lock.set_location(LatLon::new(1.0, 1.0).unwrap());
                    model.located = true;
                }
                Event::TryLock { token, ttl_ms } => {
                    let token = model.token(token);
                    let deadline = now + Duration::from_millis(*ttl_ms);
                    let offer = Offer { offer_id: next_offer, fencing_token: token, deadline, holder: 7 };
                    let result = lock.try_lock(offer, now).map(|o| o.offer_id);
                    let expected: Result<OfferId, LockRefused> = match model.doing {
                        Doing::Offered { .. } | Doing::Held { .. } => Err(LockRefused::AlreadyOffered),
                        Doing::OnTrip { .. } => Err(LockRefused::OnTrip),
                        Doing::Free if !(model.connected && model.wants_work) => Err(LockRefused::Offline),
                        Doing::Free if !model.located => Err(LockRefused::NoLocation),
                        Doing::Free if token <= model.newest => Err(LockRefused::StaleToken { offered: token, newest: model.newest }),
                        Doing::Free if deadline <= now => Err(LockRefused::DeadlinePassed),
                        Doing::Free => Ok(next_offer),
                    };
                    prop_assert_eq!(result, expected);
                    if expected.is_ok() {
                        model.newest = token;
                        model.doing = Doing::Offered { offer_id: next_offer, token, deadline };
                        model.granted.push(next_offer);
                    }
                    next_offer += 1;
                }
                Event::Accept(t) | Event::Decline(t) => {
                    let accepting = matches!(event, Event::Accept(_));
                    let id = model.target(t);
                    let trip_id = next_trip;
                    next_trip += 1;
                    let result = if accepting { lock.accept(id, trip_id, now) } else { lock.decline(id, now) };
                    match (&model.doing, result) {
                        (Doing::Offered { offer_id, deadline, .. }, result) if *offer_id == id => {
                            let deadline = *deadline;
                            match result {
                                Ok(ended) => {
                                    // Answers are taken only before the deadline.
                                    prop_assert!(now < deadline, "answer taken at the deadline or after");
                                    let ending = if accepting { Ending::Accepted } else { Ending::Declined };
                                    prop_assert_eq!(ended.ending, ending);
                                    prop_assert_eq!(ended.trip_id, accepting.then_some(trip_id));
                                    if accepting {
                                        model.doing = Doing::OnTrip { trip_id };
                                        model.remember(id, Ending::Accepted);
                                    } else {
                                        model.end(Ending::Declined);
                                    }
                                    want.push((id, ending));
                                    got.push(ended);
                                }
                                Err(AnswerError::ExpiredNow(ended)) => {
                                    prop_assert!(now >= deadline, "expired before the deadline");
                                    model.end(Ending::Expired);
                                    want.push((id, Ending::Expired));
                                    got.push(*ended);
                                }
                                Err(other) => prop_assert!(false, "answer to the held offer refused: {other:?}"),
                            }
                        }
                        (Doing::Held { offer_id, .. }, result) if *offer_id == id => {
                            prop_assert!(matches!(result, Err(AnswerError::AlreadyAccepted(o)) if o == id), "{result:?}");
                        }
                        (_, Ok(ended)) => prop_assert!(false, "answer to offer {id} taken while not held: {ended:?}"),
                        (_, Err(AnswerError::AlreadyAccepted(o))) => prop_assert!(false, "{o} called accepted while not held"),
                        (_, Err(AnswerError::ExpiredNow(ended))) => prop_assert!(false, "{id} not held, yet expired now: {ended:?}"),
                        (_, Err(AnswerError::OfferEnded { offer_id, ending })) => {
                            prop_assert_eq!(offer_id, id);
                            prop_assert_eq!(Some(ending), model.ending_of(id));
                        }
                        (_, Err(AnswerError::UnknownOffer(offer_id))) => {
                            prop_assert_eq!(offer_id, id);
                            prop_assert_eq!(model.ending_of(id), None, "a remembered offer was called unknown");
                        }
                    }
                }
                Event::Advance(ms) => now += Duration::from_millis(*ms),
                Event::AdvanceToDeadline => {
                    if let Doing::Offered { deadline, .. } | Doing::Held { deadline, .. } = model.doing {
                        now = now.max(deadline);
                    }
                }
                Event::Hold(t, ttl_ms) => {
                    let id = model.target(t);
                    let until = now + Duration::from_millis(*ttl_ms);
                    let result = lock.hold(id, until, now).map(|o| o.offer_id);
                    match (model.doing.clone(), result) {
                        (Doing::Offered { offer_id, token, deadline }, result) if offer_id == id => {
                            if now < deadline {
                                prop_assert_eq!(result, Ok(id));
                                model.doing = Doing::Held { offer_id, token, deadline: until };
                            } else {
                                match result {
                                    Err(AnswerError::ExpiredNow(ended)) => {
                                        model.end(Ending::Expired);
                                        want.push((id, Ending::Expired));
                                        got.push(*ended);
                                    }
                                    other => prop_assert!(false, "hold past the deadline: {other:?}"),
                                }
                            }
                        }
                        (Doing::Held { offer_id, .. }, result) if offer_id == id => {
                            prop_assert!(matches!(result, Err(AnswerError::AlreadyAccepted(o)) if o == id), "{result:?}");
                        }
                        (_, Ok(o)) => prop_assert!(false, "held {o}, which was not offered"),
                        (_, Err(AnswerError::OfferEnded { offer_id, ending })) => {
                            prop_assert_eq!(offer_id, id);
                            prop_assert_eq!(Some(ending), model.ending_of(id));
                        }
                        (_, Err(AnswerError::UnknownOffer(offer_id))) => {
                            prop_assert_eq!(offer_id, id);
                            prop_assert_eq!(model.ending_of(id), None);
                        }
                        (_, Err(other)) => prop_assert!(false, "hold of {id}: {other:?}"),
                    }
                }
                Event::Commit { right_token } => {
                    let (id, token) = match model.doing {
                        Doing::Held { offer_id, token, .. } | Doing::Offered { offer_id, token, .. } => {
                            (offer_id, if *right_token { token } else { token + 1 })
                        }
                        _ => (model.target(&Target::Current), model.newest),
                    };
                    let trip_id = next_trip;
                    next_trip += 1;
                    let ended = lock.commit(id, token, trip_id);
                    match model.doing {
                        Doing::Held { offer_id, token: held, .. } if offer_id == id && held == token => {
                            let ended = ended.expect("a held offer commits");
                            prop_assert_eq!(ended.trip_id, Some(trip_id));
                            want.push((id, Ending::Accepted));
                            got.push(ended);
                            model.doing = Doing::OnTrip { trip_id };
                            model.remember(id, Ending::Accepted);
                        }
                        // Only a hold commits: not an offer still deciding,
                        // nor another lock's.
                        _ => prop_assert!(ended.is_none(), "committed {ended:?}"),
                    }
                }
                Event::Expire => {
                    got.extend(lock.expire(now));
                    if let Doing::Offered { deadline, .. } | Doing::Held { deadline, .. } = model.doing {
                        if deadline <= now {
                            want.extend(model.end(Ending::Expired).map(|id| (id, Ending::Expired)));
                        }
                    }
                }
                Event::Cancel { right_id, right_token, why } => {
                    let (id, token) = match model.doing {
                        Doing::Offered { offer_id, token, .. } | Doing::Held { offer_id, token, .. } => (
                            if *right_id { offer_id } else { offer_id + 1 },
                            if *right_token { token } else { token + 1 },
                        ),
                        _ => (model.target(&Target::Current), model.newest),
                    };
                    got.extend(lock.cancel(id, token, *why));
                    if let Doing::Offered { offer_id, token: held, .. } | Doing::Held { offer_id, token: held, .. } = model.doing {
                        if offer_id == id && held == token {
                            want.extend(model.end(*why).map(|id| (id, *why)));
                        }
                    }
                }
                Event::Lose(t) => {
                    let id = model.target(t);
                    got.extend(lock.lose(id));
                    if matches!(model.doing, Doing::Offered { offer_id, .. } | Doing::Held { offer_id, .. } if offer_id == id) {
                        // Lost where it is really held: expired, whatever the
                        // local deadline says.
                        want.extend(model.end(Ending::Expired).map(|id| (id, Ending::Expired)));
                    }
                }
                Event::AdoptTrip { token } => {
                    let token = model.token(token);
                    let trip_id = next_trip;
                    next_trip += 1;
                    let trip = Trip { trip_id, offer_id: 555_000 + trip_id, fencing_token: token, holder: 9 };
                    let adopted = lock.adopt_trip(trip);
                    prop_assert_eq!(adopted, model.doing == Doing::Free);
                    if adopted {
                        model.doing = Doing::OnTrip { trip_id };
                        model.newest = model.newest.max(token);
                    }
                }
                Event::CompleteTrip { right_trip } => {
                    let id = match model.doing {
                        Doing::OnTrip { trip_id } if *right_trip => trip_id,
                        Doing::OnTrip { trip_id } => trip_id + 1,
                        _ => 123_456,
                    };
                    let completed = lock.complete_trip(id).map(|t| t.trip_id);
                    match model.doing {
                        Doing::OnTrip { trip_id } if trip_id == id => {
                            prop_assert_eq!(completed, Ok(id));
                            model.doing = Doing::Free;
                        }
                        _ => prop_assert!(completed.is_err()),
                    }
                }
            }

            // Every ending the model expects, and no other.
            prop_assert_eq!(endings_of(&got), want, "after {:?}", event);
            // And the two agree on everything observable.
            prop_assert_eq!(lock.availability(), model.availability(), "after {:?}", event);
            prop_assert_eq!(lock.newest_token(), model.newest);
            match (lock.state(), &model.doing) {
                (LockState::Free, Doing::Free) => {}
                (LockState::Offered(o), Doing::Offered { offer_id, token, deadline }) => {
                    prop_assert_eq!((o.offer_id, o.fencing_token, o.deadline), (*offer_id, *token, *deadline));
                }
                (LockState::Held(o), Doing::Held { offer_id, token, deadline }) => {
                    prop_assert_eq!((o.offer_id, o.fencing_token, o.deadline), (*offer_id, *token, *deadline));
                }
                (LockState::OnTrip(t), Doing::OnTrip { trip_id }) => prop_assert_eq!(t.trip_id, *trip_id),
                (state, doing) => prop_assert!(false, "lock {state:?}, model {doing:?}"),
            }
            for &(id, ending) in &model.remembered {
                prop_assert_eq!(lock.ending_of(id), Some(ending));
            }
            if let Some(&forgotten) = model.granted.iter().find(|id| {
                model.ending_of(**id).is_none()
                    && !matches!(model.doing, Doing::Offered { offer_id, .. } | Doing::Held { offer_id, .. } if offer_id == **id)
            }) {
                prop_assert_eq!(lock.ending_of(forgotten), None);
            }
        }
    }
}
