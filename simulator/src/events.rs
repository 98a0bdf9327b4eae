//! What a worker process tells its coordinator (`--workers`): one JSON
//! object per line on its stdout. Everything that ties one client's view to
//! another's goes through here, because the two may be in different
//! workers: a request's sending and its first offer (request→offer), and
//! the ledger of requests (acknowledged, accepted, final). Everything a
//! worker can judge alone (one driver's offers and trips, its own riders'
//! latencies) it judges itself and sends in its [`Totals`] at the end.

use std::io::Write;
use std::sync::mpsc;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::checker::Final;
use crate::totals::Totals;

/// One line from a worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "e", rename_all = "snake_case")]
pub enum Event {
    /// A rider sent request `id` at `t` (see [`unix_ns`]).
    Sent { id: String, vehicles: u8, t: u64 },
    /// The engine answered `searching`.
    Acknowledged { id: String },
    /// A driver saw an offer of request `id` at `t`.
    Offer { id: String, t: u64 },
    /// `driver` is about to send `accept` for request `id`.
    Accept { id: String, driver: String },
    /// A final message for request `id`.
    Final { id: String, how: Final },
    /// The worker's live counts, twice a second.
    Progress {
        connected: u64,
        requests: u64,
        matches: u64,
        locations: u64,
        violations: u64,
    },
    /// Every request of the worker's riders has ended; its drivers stay
    /// connected (other workers' riders may still be offered them) until
    /// the coordinator closes the worker's stdin, once every worker is
    /// drained.
    Drained,
    /// The worker's run is over: what it counted.
    Done(Box<Totals>),
}

/// Waits (a worker) until the coordinator closes this process's stdin, which
/// it does once every worker has drained, or dies; at most `longest`.
pub async fn released_by_coordinator(longest: Duration) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        // Nothing is written to a worker's stdin: reading ends at its close.
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = tx.send(());
    });
    let _ = tokio::time::timeout(longest, rx).await;
}

/// The one clock every process on the machine shares, in nanoseconds since
/// the Unix epoch, for an [`Instant`] of this process.
pub fn unix_ns(at: Instant) -> u64 {
    let (base_instant, base_unix) = *BASE;
    let unix = if at >= base_instant {
        base_unix + (at - base_instant)
    } else {
        base_unix.saturating_sub(base_instant - at)
    };
    unix.as_nanos() as u64
}

/// The [`Instant`] of this process at `ns` (see [`unix_ns`]).
pub fn instant_at(ns: u64) -> Instant {
    let (base_instant, base_unix) = *BASE;
    let unix = Duration::from_nanos(ns);
    if unix >= base_unix {
        base_instant + (unix - base_unix)
    } else {
        base_instant
            .checked_sub(base_unix - unix)
            .unwrap_or(base_instant)
    }
}

static BASE: LazyLock<(Instant, Duration)> = LazyLock::new(|| {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (Instant::now(), unix)
});

/// Where a worker's events go: a thread writing them to stdout in order.
pub struct EventSink {
    queue: Mutex<Option<mpsc::Sender<Event>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl EventSink {
    /// Starts the writer.
    pub fn to_stdout() -> EventSink {
        let (tx, rx) = mpsc::channel::<Event>();
        let writer = std::thread::spawn(move || {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            fn write(out: &mut impl Write, event: &Event) {
                let _ = serde_json::to_writer(&mut *out, event);
                let _ = out.write_all(b"\n");
            }
            while let Ok(event) = rx.recv() {
                write(&mut out, &event);
                // Everything already waiting, then one flush: lines go out
                // promptly without a write per event under load.
                while let Ok(next) = rx.try_recv() {
                    write(&mut out, &next);
                }
                let _ = out.flush();
            }
            let _ = out.flush();
        });
        EventSink {
            queue: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        }
    }

    /// Sends `event` (after the sink is closed: dropped).
    pub fn send(&self, event: Event) {
        if let Some(queue) = &*self.queue.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = queue.send(event);
        }
    }

    /// Sends `last`, then waits until every event is written.
    pub fn close(&self, last: Event) {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(queue) = queue {
            let _ = queue.send(last);
        }
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(writer) = writer {
            let _ = writer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_back_as_written() {
        let events = [
            Event::Sent {
                id: "w1-r7".into(),
                vehicles: 2,
                t: 1_700_000_000_123_456_789,
            },
            Event::Offer {
                id: "w1-r7".into(),
                t: 1_700_000_000_223_456_789,
            },
            Event::Accept {
                id: "w1-r7".into(),
                driver: "w0-d3".into(),
            },
            Event::Drained,
            Event::Done(Box::new(Totals {
                requests: 5,
                request_to_offer: vec![(120, 3), (900, 1)],
                ..Totals::default()
            })),
        ];
        for event in events {
            let line = serde_json::to_string(&event).unwrap();
            assert!(!line.contains('\n'), "one event, one line: {line}");
            let back: Event = serde_json::from_str(&line).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), line);
        }
        // Times survive the trip between processes to the microsecond.
        let now = Instant::now();
        let back = instant_at(unix_ns(now));
        let gap = if back > now { back - now } else { now - back };
        assert!(gap < Duration::from_micros(1), "{gap:?}");
    }
}
