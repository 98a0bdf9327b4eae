//! The invariants, checked live from the clients' side.
//!
//! [`DriverWatch`] sits in each virtual driver and sees that driver's messages
//! in order; [`RequestLedger`] is shared by everyone and ties riders' final
//! messages to drivers' accepts. Both return a description for every broken
//! rule; they never panic on what the engine sends.
//!
//! Races the engine is allowed: an offer revoked (expired, cancelled) while
//! the driver's decline was on its way; one offer already on the wire when the
//! driver said `unavailable` (the engine ends it when the `unavailable`
//! arrives).

use std::collections::HashMap;

/// What one driver holds, as the driver sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holding {
    Free,
    Offered(u64),
    Accepting(u64),
    OnTrip(u64),
}

/// One driver's view: no two offers, no two trips, no offer after `unavailable`.
#[derive(Debug)]
pub struct DriverWatch {
    id: String,
    holding: Holding,
    /// An offer this driver let go of (declined, or ended by `unavailable`)
    /// that the engine may still revoke.
    let_go: Option<u64>,
    unavailable: bool,
    offers_since_unavailable: u32,
}

impl DriverWatch {
    /// A driver that holds nothing.
    pub fn new(id: impl Into<String>) -> Self {
        DriverWatch {
            id: id.into(),
            holding: Holding::Free,
            let_go: None,
            unavailable: false,
            offers_since_unavailable: 0,
        }
    }

    /// An `offer` arrived.
    pub fn offer(&mut self, offer_id: u64) -> Option<String> {
        let mut violation = match self.holding {
            Holding::Free => None,
            Holding::Offered(o) | Holding::Accepting(o) => Some(format!(
                "driver {} got offer {offer_id} while holding offer {o}",
                self.id
            )),
            Holding::OnTrip(t) => Some(format!(
                "driver {} got offer {offer_id} while on trip {t}",
                self.id
            )),
        };
        if self.unavailable {
            self.offers_since_unavailable += 1;
            if self.offers_since_unavailable > 1 {
                violation.get_or_insert(format!(
                    "driver {} got offer {offer_id} after saying unavailable",
                    self.id
                ));
            }
            // The engine will end it when our `unavailable` arrives.
            self.let_go = Some(offer_id);
            return violation;
        }
        if !matches!(self.holding, Holding::OnTrip(_)) {
            self.holding = Holding::Offered(offer_id);
        }
        violation
    }

    /// The driver sent `accept` (true) or `decline` for `offer_id`.
    pub fn answered(&mut self, offer_id: u64, accept: bool) {
        if self.holding == Holding::Offered(offer_id) {
            if accept {
                self.holding = Holding::Accepting(offer_id);
            } else {
                self.holding = Holding::Free;
                self.let_go = Some(offer_id);
            }
        }
    }

    /// Whether `offer_id` is the offer this driver is deciding on.
    pub fn is_deciding(&self, offer_id: u64) -> bool {
        self.holding == Holding::Offered(offer_id)
    }

    /// A `waiting_for_group` arrived: the driver accepted `offer_id` and is
    /// held for its group.
    pub fn waiting_for_group(&mut self, offer_id: u64) -> Option<String> {
        match self.holding {
            Holding::Accepting(o) if o == offer_id => None,
            _ => Some(format!(
                "driver {} told it waits for the group of offer {offer_id}, which it did not accept",
                self.id
            )),
        }
    }

    /// An `offer_revoked` arrived.
    pub fn revoked(&mut self, offer_id: u64) -> Option<String> {
        match self.holding {
            Holding::Offered(o) | Holding::Accepting(o) if o == offer_id => {
                self.holding = Holding::Free;
                None
            }
            _ if self.let_go == Some(offer_id) => None,
            _ => Some(format!(
                "driver {} had offer {offer_id} revoked, which it did not hold",
                self.id
            )),
        }
    }

    /// A `trip_assigned` arrived.
    pub fn trip_assigned(&mut self, trip_id: u64, offer_id: u64) -> Option<String> {
        match self.holding {
            Holding::Accepting(o) if o == offer_id => {
                self.holding = Holding::OnTrip(trip_id);
                None
            }
            Holding::OnTrip(t) => Some(format!(
                "driver {} assigned trip {trip_id} while on trip {t}",
                self.id
            )),
            _ => Some(format!(
                "driver {} assigned trip {trip_id} for offer {offer_id} it did not accept",
                self.id
            )),
        }
    }

    /// The driver sent `trip_completed`.
    pub fn trip_completed(&mut self) {
        if matches!(self.holding, Holding::OnTrip(_)) {
            self.holding = Holding::Free;
        }
    }

    /// The driver sent `unavailable`; an offer it held is over.
    pub fn unavailable(&mut self) {
        self.unavailable = true;
        self.offers_since_unavailable = 0;
        if let Holding::Offered(o) = self.holding {
            self.holding = Holding::Free;
            self.let_go = Some(o);
        }
    }

    /// The driver sent `available`.
    pub fn available(&mut self) {
        self.unavailable = false;
    }
}

/// How a request ended, as its rider heard it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Final {
    /// `matched`, naming every driver.
    Matched(Vec<String>),
    /// `no_driver`.
    NoDriver,
    /// `cancelled`.
    Cancelled,
}

#[derive(Debug, Default)]
struct Entry {
    acknowledged: bool,
    finals: u8,
    accepted_by: Vec<String>,
    /// Drivers a `matched` named whose accept has not been seen yet (only
    /// across processes, where the driver's accept and the rider's
    /// `matched` come down different pipes).
    unconfirmed: Vec<String>,
    /// Vehicles asked for (0: not recorded, taken as 1).
    vehicles: u8,
}

/// Every request of the run: exactly one final each, and `matched` only
/// naming a driver who accepted that request.
#[derive(Debug, Default)]
pub struct RequestLedger {
    requests: HashMap<String, Entry>,
    /// Acknowledged requests whose (first) final message has arrived.
    finished: usize,
    acknowledged: usize,
    /// Accepts may arrive after the `matched` naming them (see
    /// [`RequestLedger::across_processes`]).
    accepts_may_lag: bool,
}

impl RequestLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty ledger fed by several worker processes: a driver's accept
    /// (recorded by the driver's worker before it is sent) may still reach
    /// the ledger after the rider's `matched` from another worker, so a
    /// `matched` naming a driver not yet seen accepting is a violation only
    /// if that accept never arrives by [`RequestLedger::finish`].
    pub fn across_processes() -> Self {
        RequestLedger {
            accepts_may_lag: true,
            ..Self::default()
        }
    }

    /// The engine answered `searching`: it now owes this request one final.
    pub fn acknowledged(&mut self, request_id: &str) {
        let entry = self.requests.entry(request_id.to_string()).or_default();
        if !entry.acknowledged {
            entry.acknowledged = true;
            self.acknowledged += 1;
            // A final can't precede its `searching` on one connection, but
            // count it if the order ever were otherwise.
            if entry.finals > 0 {
                self.finished += 1;
            }
        }
    }

    /// The rider asks for `vehicles` vehicles with `request_id`.
    pub fn requested(&mut self, request_id: &str, vehicles: u8) {
        self.requests
            .entry(request_id.to_string())
            .or_default()
            .vehicles = vehicles;
    }

    /// `driver` sent `accept` for an offer of `request_id` (recorded before
    /// sending, so it always precedes the rider's `matched`).
    pub fn accept_sent(&mut self, request_id: &str, driver: &str) {
        let entry = self.requests.entry(request_id.to_string()).or_default();
        entry.unconfirmed.retain(|d| d != driver);
        entry.accepted_by.push(driver.to_string());
    }

    /// A final message arrived for `request_id`.
    pub fn final_message(&mut self, request_id: &str, how: Final) -> Option<String> {
        let entry = self.requests.entry(request_id.to_string()).or_default();
        entry.finals += 1;
        if entry.finals == 1 && entry.acknowledged {
            self.finished += 1;
        }
        if entry.finals > 1 {
            return Some(format!(
                "request {request_id} got a second final message ({how:?})"
            ));
        }
        let Final::Matched(drivers) = how else {
            return None;
        };
        // Every vehicle asked for, each a different driver who accepted.
        let wanted = usize::from(entry.vehicles.max(1));
        let mut distinct = drivers.clone();
        distinct.sort();
        distinct.dedup();
        if drivers.len() != wanted || distinct.len() != wanted {
            return Some(format!(
                "request {request_id} for {wanted} vehicles matched to {drivers:?}"
            ));
        }
        let unaccepted = drivers.iter().filter(|d| !entry.accepted_by.contains(d));
        if self.accepts_may_lag {
            entry.unconfirmed = unaccepted.cloned().collect();
            return None;
        }
        unaccepted
            .map(|d| format!("request {request_id} matched to {d}, who did not accept it"))
            .next()
    }

    /// At the end of the run (after the drain): requests still owed a final.
    pub fn finish(&self) -> Vec<String> {
        let mut missing: Vec<String> = self
            .requests
            .iter()
            .filter(|(_, e)| e.acknowledged && e.finals == 0)
            .map(|(id, _)| format!("request {id} never got a final message"))
            .collect();
        for (id, entry) in &self.requests {
            for driver in &entry.unconfirmed {
                missing.push(format!(
                    "request {id} matched to {driver}, who did not accept it"
                ));
            }
        }
        missing.sort();
        missing
    }

    /// Requests the engine acknowledged.
    pub fn acknowledged_count(&self) -> usize {
        self.acknowledged
    }

    /// Acknowledged requests still owed a final message.
    pub fn open_count(&self) -> usize {
        self.acknowledged - self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_offers_at_once_are_caught() {
        let mut d = DriverWatch::new("d");
        assert_eq!(d.offer(1), None);
        assert!(d.offer(2).unwrap().contains("while holding offer 1"));
    }

    #[test]
    fn offers_after_answers_and_revokes_are_fine() {
        let mut d = DriverWatch::new("d");
        d.offer(1);
        d.answered(1, false);
        assert_eq!(d.offer(2), None);
        assert_eq!(d.revoked(2), None);
        assert_eq!(d.offer(3), None);
        d.answered(3, true);
        assert_eq!(d.trip_assigned(10, 3), None);
        d.trip_completed();
        assert_eq!(d.offer(4), None);
    }

    #[test]
    fn a_revoke_racing_a_decline_is_allowed_but_a_stray_revoke_is_not() {
        let mut d = DriverWatch::new("d");
        d.offer(1);
        d.answered(1, false);
        assert_eq!(d.revoked(1), None);
        assert!(d.revoked(7).is_some());
    }

    #[test]
    fn an_offer_during_a_trip_or_a_second_trip_is_caught() {
        let mut d = DriverWatch::new("d");
        d.offer(1);
        d.answered(1, true);
        d.trip_assigned(10, 1);
        assert!(d.offer(2).unwrap().contains("while on trip 10"));
        assert!(d.trip_assigned(11, 2).unwrap().contains("while on trip 10"));
    }

    #[test]
    fn a_trip_without_an_accept_is_caught() {
        let mut d = DriverWatch::new("d");
        d.offer(1);
        assert!(d.trip_assigned(10, 1).unwrap().contains("did not accept"));
    }

    #[test]
    fn only_the_offer_already_on_the_wire_may_follow_unavailable() {
        let mut d = DriverWatch::new("d");
        d.unavailable();
        assert_eq!(d.offer(1), None); // in flight when we said it
        assert!(d.offer(2).unwrap().contains("after saying unavailable"));
        d.available();
        assert_eq!(d.offer(3), None);
    }

    #[test]
    fn every_request_gets_exactly_one_final() {
        let mut ledger = RequestLedger::new();
        ledger.acknowledged("a");
        ledger.acknowledged("b");
        ledger.acknowledged("c");
        assert_eq!(ledger.final_message("a", Final::NoDriver), None);
        assert!(ledger
            .final_message("a", Final::Cancelled)
            .unwrap()
            .contains("second"));
        assert_eq!(ledger.final_message("b", Final::Cancelled), None);
        assert_eq!(ledger.finish(), vec!["request c never got a final message"]);
        assert_eq!(ledger.open_count(), 1);
        assert_eq!(ledger.acknowledged_count(), 3);
    }

    #[test]
    fn matched_must_name_a_driver_who_accepted() {
        let mut ledger = RequestLedger::new();
        ledger.acknowledged("a");
        ledger.accept_sent("a", "d1");
        assert!(ledger
            .final_message("a", Final::Matched(vec!["d2".into()]))
            .unwrap()
            .contains("did not accept"));
        ledger.acknowledged("b");
        ledger.accept_sent("b", "d1");
        assert_eq!(
            ledger.final_message("b", Final::Matched(vec!["d1".into()])),
            None
        );
    }

    #[test]
    fn a_group_is_matched_whole_with_drivers_who_all_accepted() {
        let mut ledger = RequestLedger::new();
        for id in ["g1", "g2", "g3"] {
            ledger.requested(id, 2);
            ledger.acknowledged(id);
            ledger.accept_sent(id, "d1");
            ledger.accept_sent(id, "d2");
        }
        let partial = ledger.final_message("g1", Final::Matched(vec!["d1".into()]));
        assert!(partial.unwrap().contains("for 2 vehicles"));
        let twice = ledger.final_message("g2", Final::Matched(vec!["d1".into(), "d1".into()]));
        assert!(twice.unwrap().contains("for 2 vehicles"));
        let whole = ledger.final_message("g3", Final::Matched(vec!["d2".into(), "d1".into()]));
        assert_eq!(whole, None);
        ledger.requested("g4", 2);
        ledger.acknowledged("g4");
        ledger.accept_sent("g4", "d1");
        let unaccepted = ledger.final_message("g4", Final::Matched(vec!["d1".into(), "d3".into()]));
        assert!(unaccepted.unwrap().contains("d3, who did not accept"));
    }

    #[test]
    fn waiting_for_a_group_follows_an_accept_and_holds_the_driver() {
        let mut d = DriverWatch::new("d");
        assert!(d.waiting_for_group(1).is_some());
        d.offer(1);
        d.answered(1, true);
        assert_eq!(d.waiting_for_group(1), None);
        assert!(d.offer(2).unwrap().contains("while holding offer 1"));
        let mut d = DriverWatch::new("d");
        d.offer(1);
        d.answered(1, true);
        d.waiting_for_group(1);
        // Let go (group incomplete, or taken by an older group): free again.
        assert_eq!(d.revoked(1), None);
        assert_eq!(d.offer(2), None);
    }

    #[test]
    fn across_processes_an_accept_may_come_after_its_matched_but_must_come() {
        let mut ledger = RequestLedger::across_processes();
        ledger.acknowledged("a");
        assert_eq!(
            ledger.final_message("a", Final::Matched(vec!["d1".into()])),
            None
        );
        ledger.accept_sent("a", "d1");
        ledger.acknowledged("b");
        assert_eq!(
            ledger.final_message("b", Final::Matched(vec!["d2".into()])),
            None
        );
        assert_eq!(
            ledger.finish(),
            vec!["request b matched to d2, who did not accept it"]
        );
    }

    #[test]
    fn unacknowledged_requests_are_not_owed_a_final() {
        let mut ledger = RequestLedger::new();
        ledger.accept_sent("x", "d1");
        assert!(ledger.finish().is_empty());
        assert_eq!(ledger.acknowledged_count(), 0);
    }
}
