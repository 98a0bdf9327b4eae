//! The lock rules of one driver, as a plain state machine.
//!
//! No sockets, no timers, no clock reads: every method that depends on time
//! takes `now`. The driver actor ([`crate::driver`]) wraps one
//! [`DriverLock`] per driver and turns its answers into messages; unit and
//! property tests drive it directly. A lock held elsewhere (Redis, for several
//! engine nodes) sits behind the same methods: whoever grants the lock hands in
//! the fencing token, and this machine refuses any token that is not newer than
//! the last one it saw.
//!
//! The rules:
//! - a driver holds at most one offer or one trip at a time (one [`LockState`]);
//! - an offer is granted only to a driver who is connected, wants work, has a
//!   known location and is free, and only with a fencing token greater than any
//!   seen before;
//! - every offer ends exactly once ([`Ending`]); every ending but `Accepted`
//!   frees the driver at once;
//! - an offer is answerable only while `now < deadline`;
//! - an offer of a group (several vehicles for one request) that the driver
//!   accepts is *held* for the group ([`LockState::Held`]) until its holder
//!   commits it (a trip) or lets it go, or its own deadline passes: the
//!   driver's part is decided, like a participant of a two-phase commit that
//!   voted yes, so neither a disconnect nor `unavailable` ends it.

use std::collections::VecDeque;
use std::time::Instant;

use crate::location::LatLon;

mod outcomes;
pub use outcomes::{AnswerError, Availability, Ended, Ending, LockRefused, TripError};

/// Identifies one offer (one lock); unique across the engine.
pub type OfferId = u64;
/// Identifies one trip; unique across the engine.
pub type TripId = u64;
/// A lock's fencing token: strictly greater for every newer lock of a driver.
pub type FencingToken = u64;

/// How many ended offers a driver remembers, so that a late `accept` of one
/// is told `offer_expired` rather than `unknown_offer`.
const REMEMBERED_ENDINGS: usize = 8;

/// A granted lock: the driver is offered to one holder until `deadline`.
#[derive(Clone, Debug, PartialEq)]
pub struct Offer<H> {
    /// The offer's id, as sent to the driver.
    pub offer_id: OfferId,
    /// The lock's fencing token.
    pub fencing_token: FencingToken,
    /// The instant the offer lapses; it is answerable only before it.
    pub deadline: Instant,
    /// Who holds the lock (the ride request, in the engine).
    pub holder: H,
}

/// A trip the driver accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct Trip<H> {
    /// The trip's id.
    pub trip_id: TripId,
    /// The offer the trip came from.
    pub offer_id: OfferId,
    /// The fencing token of that offer's lock.
    pub fencing_token: FencingToken,
    /// Who the trip is for.
    pub holder: H,
}

/// What a driver's lock is doing.
#[derive(Clone, Debug, PartialEq)]
pub enum LockState<H> {
    /// Nobody holds the driver.
    Free,
    /// Offered to one holder, waiting for the driver's answer.
    Offered(Offer<H>),
    /// A group's offer the driver accepted, held for the group until its
    /// holder commits it or lets it go; `deadline` is then how long the hold
    /// lasts at most.
    Held(Offer<H>),
    /// Assigned to a trip until the driver completes it.
    OnTrip(Trip<H>),
}

/// One driver's lock and the facts that decide whether it may be locked.
#[derive(Clone, Debug)]
pub struct DriverLock<H> {
    connected: bool,
    wants_work: bool,
    location: Option<LatLon>,
    /// The last location is too old to offer the driver by (see
    /// [`DriverLock::location_went_stale`]).
    location_stale: bool,
    state: LockState<H>,
    newest_token: FencingToken,
    recent_endings: VecDeque<(OfferId, Ending)>,
}

impl<H> Default for DriverLock<H> {
    fn default() -> Self {
        Self::new()
    }
}

impl<H> DriverLock<H> {
    /// A driver nobody has heard from: disconnected, free, no location.
    pub fn new() -> Self {
        DriverLock {
            connected: false,
            wants_work: false,
            location: None,
            location_stale: false,
            state: LockState::Free,
            newest_token: 0,
            // Allocated on the first ending: most connected drivers never need it.
            recent_endings: VecDeque::new(),
        }
    }

    /// The lock itself.
    pub fn state(&self) -> &LockState<H> {
        &self.state
    }

    /// The last known location.
    pub fn location(&self) -> Option<LatLon> {
        self.location
    }

    /// Whether a session is attached.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The newest fencing token this driver has seen.
    pub fn newest_token(&self) -> FencingToken {
        self.newest_token
    }

    /// The offer being held, if any: waiting for the driver's answer, or
    /// accepted and held for its group.
    pub fn current_offer(&self) -> Option<&Offer<H>> {
        match &self.state {
            LockState::Offered(offer) | LockState::Held(offer) => Some(offer),
            _ => None,
        }
    }

    /// The group offer the driver accepted and is held for, if any.
    pub fn held_offer(&self) -> Option<&Offer<H>> {
        match &self.state {
            LockState::Held(offer) => Some(offer),
            _ => None,
        }
    }

    /// The state operators see.
    pub fn availability(&self) -> Availability {
        match self.state {
            LockState::Offered(_) | LockState::Held(_) => Availability::Offered,
            LockState::OnTrip(_) => Availability::OnTrip,
            LockState::Free if self.refusal().is_none() => Availability::Available,
            LockState::Free => Availability::Offline,
        }
    }

    /// Whether a lock may be granted now (ignoring the token).
    pub fn is_offerable(&self) -> bool {
        self.availability() == Availability::Available
    }

    /// Why a lock would be refused now, whatever its token; `None` when the
    /// driver is offerable.
    pub fn refusal(&self) -> Option<LockRefused> {
        match self.state {
            LockState::Offered(_) | LockState::Held(_) => Some(LockRefused::AlreadyOffered),
            LockState::OnTrip(_) => Some(LockRefused::OnTrip),
            LockState::Free if !self.connected || !self.wants_work => Some(LockRefused::Offline),
            LockState::Free if self.location.is_none() || self.location_stale => {
                Some(LockRefused::NoLocation)
            }
            LockState::Free => None,
        }
    }

    /// A session attached to the driver.
    pub fn connect(&mut self) {
        self.connected = true;
    }

    /// The driver's session went away. An offer in flight ends
    /// `DriverDisconnected`; a trip or a held group offer survives (the app
    /// may reconnect to it). The driver must say `available` again after
    /// reconnecting.
    pub fn disconnect(&mut self) -> Option<Ended<H>> {
        self.connected = false;
        self.wants_work = false;
        self.end_offer(Ending::DriverDisconnected)
    }

    /// The driver said `available` (`true`) or `unavailable` (`false`).
    ///
    /// Going unavailable while holding an offer declines it. On a trip or
    /// held for a group, the wish is remembered and takes effect when that
    /// is over.
    pub fn set_wants_work(&mut self, wants_work: bool) -> Option<Ended<H>> {
        self.wants_work = wants_work;
        if wants_work {
            None
        } else {
            self.end_offer(Ending::Declined)
        }
    }

    /// The driver reported a new position.
    pub fn set_location(&mut self, location: LatLon) {
        self.location_stale = false;
        self.location = Some(location);
    }

    /// The driver has not reported a position for too long: it is not
    /// offered until its next one (it may be parked with the app asleep, or
    /// in a tunnel). An offer or trip it holds is not affected.
    pub fn location_went_stale(&mut self) {
        self.location_stale = true;
    }

    /// Whether the last location is too old to offer the driver by.
    pub fn is_location_stale(&self) -> bool {
        self.location_stale
    }

    /// Grants the lock to `offer.holder` if the driver is offerable, the token
    /// is newer than any seen, and the deadline is in the future.
    pub fn try_lock(&mut self, offer: Offer<H>, now: Instant) -> Result<&Offer<H>, LockRefused> {
        if let Some(refused) = self.refusal() {
            return Err(refused);
        }
        if offer.fencing_token <= self.newest_token {
            return Err(LockRefused::StaleToken {
                offered: offer.fencing_token,
                newest: self.newest_token,
            });
        }
        if offer.deadline <= now {
            return Err(LockRefused::DeadlinePassed);
        }
        self.newest_token = offer.fencing_token;
        self.state = LockState::Offered(offer);
        match &self.state {
            LockState::Offered(offer) => Ok(offer),
            _ => unreachable!("state was set to Offered just above"),
        }
    }

    /// The driver accepted `offer_id`; the driver goes on trip `trip_id`.
    pub fn accept(
        &mut self,
        offer_id: OfferId,
        trip_id: TripId,
        now: Instant,
    ) -> Result<Ended<H>, AnswerError<H>>
    where
        H: Clone,
    {
        let offer = self.take_answerable(offer_id, now)?;
        Ok(self.start_trip(offer, trip_id))
    }

    /// The driver accepted `offer_id`, an offer of a group: the driver is
    /// held for the group until `until` at the latest (see
    /// [`DriverLock::commit`]).
    pub fn hold(
        &mut self,
        offer_id: OfferId,
        until: Instant,
        now: Instant,
    ) -> Result<&Offer<H>, AnswerError<H>> {
        let mut offer = self.take_answerable(offer_id, now)?;
        offer.deadline = until;
        self.state = LockState::Held(offer);
        match &self.state {
            LockState::Held(offer) => Ok(offer),
            _ => unreachable!("state was set to Held just above"),
        }
    }

    /// The group of the held offer `offer_id` (with this fencing token) is
    /// complete: the driver goes on trip `trip_id`. `None` when that hold is
    /// not the driver's any more (it lapsed, or was let go).
    pub fn commit(
        &mut self,
        offer_id: OfferId,
        token: FencingToken,
        trip_id: TripId,
    ) -> Option<Ended<H>>
    where
        H: Clone,
    {
        match &self.state {
            LockState::Held(offer)
                if offer.offer_id == offer_id && offer.fencing_token == token => {}
            _ => return None,
        }
        let LockState::Held(offer) = std::mem::replace(&mut self.state, LockState::Free) else {
            unreachable!("matched Held just above");
        };
        Some(self.start_trip(offer, trip_id))
    }

    /// The driver declined `offer_id`; the driver is free at once.
    pub fn decline(&mut self, offer_id: OfferId, now: Instant) -> Result<Ended<H>, AnswerError<H>> {
        self.check_answerable(offer_id, now)?;
        Ok(self
            .end_offer(Ending::Declined)
            .expect("check_answerable guarantees an offer is held"))
    }

    /// Ends the offer (or the group hold) if its deadline has passed (the
    /// actor's timer).
    pub fn expire(&mut self, now: Instant) -> Option<Ended<H>> {
        match self.current_offer() {
            Some(offer) if offer.deadline <= now => self.end_offer(Ending::Expired),
            _ => None,
        }
    }

    /// The holder withdrew (`why`: the rider cancelled, the group failed or
    /// an older group took the driver): ends the offer, or the group hold,
    /// only if it is still the one with this id and fencing token, so a late
    /// cancel can't free a newer lock.
    pub fn cancel(
        &mut self,
        offer_id: OfferId,
        token: FencingToken,
        why: Ending,
    ) -> Option<Ended<H>> {
        match self.current_offer() {
            Some(offer) if offer.offer_id == offer_id && offer.fencing_token == token => {
                self.end_offer(why)
            }
            _ => None,
        }
    }

    /// The lock behind `offer_id` was lost where it is really held (it
    /// lapsed in the lock store, or its requester gave up on it): the offer
    /// ends as `Expired`, whatever its local deadline says.
    pub fn lose(&mut self, offer_id: OfferId) -> Option<Ended<H>> {
        match self.current_offer() {
            Some(offer) if offer.offer_id == offer_id => self.end_offer(Ending::Expired),
            _ => None,
        }
    }

    /// How `offer_id` ended, if it is one of the offers this driver
    /// remembers.
    pub fn ending_of(&self, offer_id: OfferId) -> Option<Ending> {
        self.recent_endings
            .iter()
            .find(|(id, _)| *id == offer_id)
            .map(|&(_, ending)| ending)
    }

    /// Takes over a trip the driver is on elsewhere (cluster mode: the app
    /// reconnected to another node mid-trip). Only a free driver can; the
    /// trip's fencing token counts as seen. Whether it was taken.
    pub fn adopt_trip(&mut self, trip: Trip<H>) -> bool {
        if !matches!(self.state, LockState::Free) {
            return false;
        }
        self.newest_token = self.newest_token.max(trip.fencing_token);
        self.state = LockState::OnTrip(trip);
        true
    }

    /// The driver completed `trip_id` and is free again.
    pub fn complete_trip(&mut self, trip_id: TripId) -> Result<Trip<H>, TripError> {
        match &self.state {
            LockState::OnTrip(trip) if trip.trip_id == trip_id => {
                let LockState::OnTrip(trip) = std::mem::replace(&mut self.state, LockState::Free)
                else {
                    unreachable!("matched OnTrip just above");
                };
                Ok(trip)
            }
            _ => Err(TripError::NotYourTrip(trip_id)),
        }
    }

    /// Whether an answer to `offer_id` may be taken now. Expires the offer if
    /// its deadline has passed, handing the ending back inside the error.
    /// (`accept` and `decline` check this themselves; a caller that must do
    /// something slow before accepting, such as confirming a lock held in
    /// Redis, checks first and accepts with the same `now` afterwards.)
    pub fn check_answerable(
        &mut self,
        offer_id: OfferId,
        now: Instant,
    ) -> Result<(), AnswerError<H>> {
        match &self.state {
            LockState::Held(offer) if offer.offer_id == offer_id => {
                Err(AnswerError::AlreadyAccepted(offer_id))
            }
            LockState::Offered(offer) if offer.offer_id == offer_id => {
                if offer.deadline <= now {
                    let ended = self.end_offer(Ending::Expired);
                    Err(AnswerError::ExpiredNow(Box::new(
                        ended.expect("an offer is held"),
                    )))
                } else {
                    Ok(())
                }
            }
            _ => match self.recent_endings.iter().find(|(id, _)| *id == offer_id) {
                Some(&(offer_id, ending)) => Err(AnswerError::OfferEnded { offer_id, ending }),
                None => Err(AnswerError::UnknownOffer(offer_id)),
            },
        }
    }

    /// Takes the offer `offer_id` out of the lock if it may be answered
    /// now (the lock is free until the caller sets what comes next).
    fn take_answerable(
        &mut self,
        offer_id: OfferId,
        now: Instant,
    ) -> Result<Offer<H>, AnswerError<H>> {
        self.check_answerable(offer_id, now)?;
        let LockState::Offered(offer) = std::mem::replace(&mut self.state, LockState::Free) else {
            unreachable!("check_answerable guarantees an offer is held");
        };
        Ok(offer)
    }

    /// The driver goes on trip `trip_id` for `offer` (accepted, or its group
    /// complete): the offer's ending.
    fn start_trip(&mut self, offer: Offer<H>, trip_id: TripId) -> Ended<H>
    where
        H: Clone,
    {
        self.state = LockState::OnTrip(Trip {
            trip_id,
            offer_id: offer.offer_id,
            fencing_token: offer.fencing_token,
            holder: offer.holder.clone(),
        });
        self.remember(offer.offer_id, Ending::Accepted);
        Ended {
            offer,
            ending: Ending::Accepted,
            trip_id: Some(trip_id),
        }
    }

    /// Frees the driver from the offer it holds, if any, and records the
    /// ending. A group hold ends only by its holder, its deadline or a lost
    /// lock (`cancel`, `expire`, `lose`), never by the driver's doing.
    fn end_offer(&mut self, ending: Ending) -> Option<Ended<H>> {
        let held = matches!(self.state, LockState::Held(_));
        let by_driver = matches!(ending, Ending::Declined | Ending::DriverDisconnected);
        if !(matches!(self.state, LockState::Offered(_)) || held && !by_driver) {
            return None;
        }
        let (LockState::Offered(offer) | LockState::Held(offer)) =
            std::mem::replace(&mut self.state, LockState::Free)
        else {
            unreachable!("matched Offered or Held just above");
        };
        self.remember(offer.offer_id, ending);
        Some(Ended {
            offer,
            ending,
            trip_id: None,
        })
    }

    fn remember(&mut self, offer_id: OfferId, ending: Ending) {
        if self.recent_endings.len() == REMEMBERED_ENDINGS {
            self.recent_endings.pop_front();
        }
        self.recent_endings.push_back((offer_id, ending));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ready() -> DriverLock<u32> {
        let mut lock = DriverLock::new();
        lock.connect();
        lock.set_wants_work(true);
        lock.set_location(LatLon::new(1.0, 2.0).unwrap());
        lock
    }

    fn offer(id: OfferId, token: FencingToken, deadline: Instant, holder: u32) -> Offer<u32> {
        Offer {
            offer_id: id,
            fencing_token: token,
            deadline,
            holder,
        }
    }

    #[test]
    fn offerable_only_when_connected_wanting_work_and_located() {
        let mut lock: DriverLock<u32> = DriverLock::new();
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(15);
        assert_eq!(
            lock.try_lock(offer(1, 1, later, 7), t0),
            Err(LockRefused::Offline)
        );
        lock.connect();
        lock.set_wants_work(true);
        assert_eq!(
            lock.try_lock(offer(1, 1, later, 7), t0),
            Err(LockRefused::NoLocation)
        );
        lock.set_location(LatLon::new(0.0, 0.0).unwrap());
        assert_eq!(lock.availability(), Availability::Available);
        assert!(lock.try_lock(offer(1, 1, later, 7), t0).is_ok());
        assert_eq!(lock.availability(), Availability::Offered);
    }

    #[test]
    fn a_stale_location_is_not_offered_until_a_fresh_one() {
        let mut lock = ready();
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(15);
        lock.location_went_stale();
        assert_eq!(lock.availability(), Availability::Offline);
        assert_eq!(
            lock.try_lock(offer(1, 1, later, 7), t0),
            Err(LockRefused::NoLocation)
        );
        lock.set_location(LatLon::new(0.0, 0.0).unwrap());
        assert!(!lock.is_location_stale());
        assert!(lock.try_lock(offer(1, 1, later, 7), t0).is_ok());
    }

    #[test]
    fn a_lost_lock_ends_its_offer_as_expired_and_only_that_offer() {
        let mut lock = ready();
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(15);
        lock.try_lock(offer(1, 1, later, 7), t0).unwrap();
        assert!(lock.check_answerable(1, t0).is_ok());
        assert_eq!(lock.lose(2), None, "another offer's loss changes nothing");
        let ended = lock.lose(1).expect("the held offer ends");
        assert_eq!(ended.ending, Ending::Expired);
        assert_eq!(lock.availability(), Availability::Available);
        assert!(matches!(
            lock.accept(1, 1, t0),
            Err(AnswerError::OfferEnded {
                offer_id: 1,
                ending: Ending::Expired
            })
        ));
        assert_eq!(lock.lose(1), None, "an offer ends once");
        assert_eq!(lock.ending_of(1), Some(Ending::Expired));
        assert_eq!(lock.ending_of(2), None);
    }

    #[test]
    fn only_a_free_driver_adopts_a_trip_and_its_token_counts_as_seen() {
        let mut lock = ready();
        let t0 = Instant::now();
        let trip = Trip {
            trip_id: 9,
            offer_id: 3,
            fencing_token: 40,
            holder: 7,
        };
        lock.try_lock(offer(1, 1, t0 + Duration::from_secs(15), 7), t0)
            .unwrap();
        assert!(!lock.adopt_trip(trip.clone()), "not while offered");
        lock.decline(1, t0).unwrap();
        assert!(lock.adopt_trip(trip.clone()));
        assert_eq!(lock.availability(), Availability::OnTrip);
        assert!(!lock.adopt_trip(trip), "not while on a trip");
        lock.complete_trip(9).unwrap();
        assert!(matches!(
            lock.try_lock(offer(2, 40, t0 + Duration::from_secs(15), 8), t0),
            Err(LockRefused::StaleToken { newest: 40, .. })
        ));
    }

    #[test]
    fn second_holder_is_refused_while_offered() {
        let mut lock = ready();
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(15);
        lock.try_lock(offer(1, 1, later, 7), t0).unwrap();
        assert_eq!(
            lock.try_lock(offer(2, 2, later, 8), t0),
            Err(LockRefused::AlreadyOffered)
        );
        assert_eq!(lock.current_offer().unwrap().holder, 7);
    }

    #[test]
    fn stale_fencing_token_is_refused() {
        let mut lock = ready();
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(15);
        lock.try_lock(offer(1, 5, later, 7), t0).unwrap();
        lock.decline(1, t0).unwrap();
        assert_eq!(
            lock.try_lock(offer(2, 5, later, 8), t0),
            Err(LockRefused::StaleToken {
                offered: 5,
                newest: 5
            })
        );
        assert!(lock.try_lock(offer(2, 6, later, 8), t0).is_ok());
    }

    #[test]
    fn accept_after_deadline_expires_the_offer() {
        let mut lock = ready();
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_millis(100);
        lock.try_lock(offer(1, 1, deadline, 7), t0).unwrap();
        match lock.accept(1, 10, deadline) {
            Err(AnswerError::ExpiredNow(ended)) => assert_eq!(ended.ending, Ending::Expired),
            other => panic!("expected ExpiredNow, got {other:?}"),
        }
        assert_eq!(lock.availability(), Availability::Available);
        assert_eq!(
            lock.accept(1, 10, deadline),
            Err(AnswerError::OfferEnded {
                offer_id: 1,
                ending: Ending::Expired
            })
        );
        assert_eq!(lock.accept(99, 10, t0), Err(AnswerError::UnknownOffer(99)));
    }

    #[test]
    fn accepted_driver_is_on_trip_until_completed() {
        let mut lock = ready();
        let t0 = Instant::now();
        lock.try_lock(offer(1, 1, t0 + Duration::from_secs(1), 7), t0)
            .unwrap();
        let ended = lock.accept(1, 42, t0).unwrap();
        assert_eq!(ended.ending, Ending::Accepted);
        assert_eq!(ended.trip_id, Some(42));
        assert_eq!(lock.availability(), Availability::OnTrip);
        assert_eq!(lock.complete_trip(41), Err(TripError::NotYourTrip(41)));
        assert_eq!(lock.complete_trip(42).unwrap().holder, 7);
        assert_eq!(lock.availability(), Availability::Available);
    }

    #[test]
    fn unavailable_on_trip_takes_effect_after_the_trip() {
        let mut lock = ready();
        let t0 = Instant::now();
        lock.try_lock(offer(1, 1, t0 + Duration::from_secs(1), 7), t0)
            .unwrap();
        lock.accept(1, 42, t0).unwrap();
        assert_eq!(lock.set_wants_work(false), None);
        lock.complete_trip(42).unwrap();
        assert_eq!(lock.availability(), Availability::Offline);
    }

    #[test]
    fn late_cancel_cannot_free_a_newer_lock() {
        let mut lock = ready();
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(15);
        lock.try_lock(offer(1, 1, later, 7), t0).unwrap();
        lock.decline(1, t0).unwrap();
        lock.try_lock(offer(2, 2, later, 8), t0).unwrap();
        assert_eq!(lock.cancel(1, 1, Ending::RiderCancelled), None);
        assert_eq!(lock.current_offer().unwrap().offer_id, 2);
        assert_eq!(
            lock.cancel(2, 2, Ending::RiderCancelled).unwrap().ending,
            Ending::RiderCancelled
        );
    }

    #[test]
    fn a_held_group_offer_ends_only_by_its_holder_or_its_deadline() {
        let mut lock = ready();
        let t0 = Instant::now();
        let offer_deadline = t0 + Duration::from_secs(15);
        let hold_until = t0 + Duration::from_secs(40);
        lock.try_lock(offer(1, 1, offer_deadline, 7), t0).unwrap();
        assert_eq!(lock.hold(1, hold_until, t0).unwrap().deadline, hold_until);
        assert_eq!(lock.availability(), Availability::Offered);
        assert_eq!(lock.refusal(), Some(LockRefused::AlreadyOffered));
        // The driver's part is decided: no second answer, and neither going
        // unavailable nor disconnecting lets the hold go.
        assert_eq!(lock.decline(1, t0), Err(AnswerError::AlreadyAccepted(1)));
        assert!(matches!(
            lock.accept(1, 9, t0),
            Err(AnswerError::AlreadyAccepted(1))
        ));
        assert_eq!(lock.set_wants_work(false), None);
        assert_eq!(lock.disconnect(), None);
        // Past the offer's own deadline it stands; past the hold's it lapses.
        assert_eq!(lock.expire(offer_deadline), None);
        assert_eq!(lock.held_offer().unwrap().offer_id, 1);
        // A commit with another token is not this hold's.
        assert_eq!(lock.commit(1, 2, 42), None);
        let ended = lock.commit(1, 1, 42).unwrap();
        assert_eq!((ended.ending, ended.trip_id), (Ending::Accepted, Some(42)));
        assert!(matches!(lock.state(), LockState::OnTrip(t) if t.trip_id == 42));

        let mut lock = ready();
        lock.try_lock(offer(3, 3, offer_deadline, 7), t0).unwrap();
        lock.hold(3, hold_until, t0).unwrap();
        assert_eq!(lock.expire(hold_until).unwrap().ending, Ending::Expired);
        assert_eq!(
            lock.commit(3, 3, 43),
            None,
            "a lapsed hold can't be committed"
        );
        assert!(lock.is_offerable());

        let mut lock = ready();
        lock.try_lock(offer(4, 4, offer_deadline, 7), t0).unwrap();
        lock.hold(4, hold_until, t0).unwrap();
        assert_eq!(
            lock.cancel(4, 3, Ending::Preempted),
            None,
            "another lock's cancel"
        );
        assert_eq!(
            lock.cancel(4, 4, Ending::Preempted).unwrap().ending,
            Ending::Preempted
        );
        assert_eq!(lock.ending_of(4), Some(Ending::Preempted));
        assert!(lock.is_offerable());
    }

    // The property test of these rules against an independent model, with
    // stale and equal tokens, losses and adopted trips, is tests/lock_model.rs.
}
