//! The board shared by the driver actors and the watchers, and the
//! publisher that turns its changes into batches.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::board::{Batch, Board, DriverDot, Snapshot};
use crate::core::search::OpenRequest;
use crate::protocol::DriverId;

/// How often batches go out at most: a few times a second is smooth on a
/// map and costs the engine one serialisation per interval, not one per
/// change.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(250);
/// Watchers at once: the map is for operators, not for every client.
pub const MAX_WATCHERS: usize = 16;
/// Batches a watcher may fall behind before it is sent a snapshot instead.
const BACKLOG: usize = 16;
/// Snapshots are taken at most this often, across all watchers: each holds
/// the board (and so every driver actor that changes) for about 20 ms at
/// 20,000 drivers, and a watcher reconnecting in a loop must not turn that
/// into a lock held most of the time.
const SNAPSHOT_SPACING: Duration = Duration::from_millis(200);

/// A message of the feed.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OpsMessage<'a> {
    Snapshot(&'a Snapshot),
    Changes(&'a Batch),
}

fn encode(message: OpsMessage) -> Utf8Bytes {
    // Plain structs, strings and numbers: serialising cannot fail.
    serde_json::to_string(&message)
        .expect("ops messages always serialise")
        .into()
}

/// The board and its watchers.
pub struct OpsFeed {
    board: Mutex<Board>,
    batches: broadcast::Sender<(u64, Utf8Bytes)>,
    watchers: AtomicUsize,
    /// When the next snapshot may be taken.
    next_snapshot: Mutex<tokio::time::Instant>,
}

impl OpsFeed {
    /// An empty board nobody watches.
    pub fn new() -> Arc<Self> {
        Arc::new(OpsFeed {
            board: Mutex::new(Board::new()),
            batches: broadcast::channel(BACKLOG).0,
            watchers: AtomicUsize::new(0),
            next_snapshot: Mutex::new(tokio::time::Instant::now()),
        })
    }

    /// Reserves the next snapshot's turn and returns when it is.
    fn snapshot_turn(&self) -> tokio::time::Instant {
        let mut next = self.next_snapshot.lock().unwrap_or_else(|e| e.into_inner());
        let turn = (*next).max(tokio::time::Instant::now());
        *next = turn + SNAPSHOT_SPACING;
        turn
    }

    fn board(&self) -> MutexGuard<'_, Board> {
        // The board is a picture: one poisoned by a panic is still worth
        // showing.
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `driver` is now `dot`.
    pub fn driver_changed(&self, driver: &DriverId, dot: DriverDot) {
        self.board().driver_changed(Instant::now(), driver, dot);
    }

    /// This node no longer has `driver`.
    pub fn driver_gone(&self, driver: &DriverId) {
        self.board().driver_gone(driver);
    }

    /// A new watcher, or `None` if [`MAX_WATCHERS`] already watch.
    pub fn watch(self: &Arc<Self>) -> Option<Watch> {
        let taken = self
            .watchers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_WATCHERS).then_some(n + 1)
            });
        taken.ok()?;
        Some(Watch {
            feed: self.clone(),
            batches: self.batches.subscribe(),
            seen: 0,
        })
    }

    /// Publishes a batch every [`BATCH_INTERVAL`] while anyone watches,
    /// asking `open_requests` for the matcher's open requests each time,
    /// until `shutdown` turns true.
    pub async fn publish<F, Fut>(
        self: Arc<Self>,
        mut open_requests: F,
        mut shutdown: watch::Receiver<bool>,
    ) where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<Vec<OpenRequest>>>,
    {
        let mut interval = tokio::time::interval(BATCH_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = shutdown.changed() => return,
            }
            {
                // Checked under the board's lock: a watcher counted after
                // this takes its snapshot (under the same lock) after
                // `unwatched`, so it is never left unrecorded.
                let mut board = self.board();
                if self.watchers.load(Ordering::Acquire) == 0 {
                    board.unwatched();
                    continue;
                }
            }
            let open = open_requests().await;
            let batch = {
                let mut board = self.board();
                if let Some(open) = open {
                    board.requests_are(open);
                }
                board.take_batch(Instant::now())
            };
            if let Some(batch) = batch {
                let text = encode(OpsMessage::Changes(&batch));
                crate::metrics::ops_batch(text.len());
                // No receiver is fine: the last watcher just left.
                let _ = self.batches.send((batch.seq, text));
            }
        }
    }
}

/// What a watcher gets next.
pub enum Next {
    /// A message to send.
    Send(Utf8Bytes),
    /// The engine is shutting the feed down.
    Closed,
}

/// One watcher's place in the feed.
pub struct Watch {
    feed: Arc<OpsFeed>,
    batches: broadcast::Receiver<(u64, Utf8Bytes)>,
    /// The newest batch the watcher holds (in a snapshot or as a batch).
    seen: u64,
}

impl Watch {
    /// The whole picture, in its turn (see [`SNAPSHOT_SPACING`]); the
    /// batches after it follow.
    pub async fn snapshot(&mut self) -> Utf8Bytes {
        tokio::time::sleep_until(self.feed.snapshot_turn()).await;
        let snapshot = {
            let mut board = self.feed.board();
            // Subscribing under the board's lock: every batch taken after
            // this snapshot is received. Batches taken before it may still
            // arrive; their numbers are at most the snapshot's, and they are
            // skipped.
            self.batches = self.feed.batches.subscribe();
            board.snapshot(Instant::now())
        };
        self.seen = snapshot.seq;
        encode(OpsMessage::Snapshot(&snapshot))
    }

    /// The next message: a batch, or a fresh snapshot for a watcher that
    /// fell behind.
    pub async fn next(&mut self) -> Next {
        loop {
            match self.batches.recv().await {
                Ok((seq, text)) if seq > self.seen => {
                    self.seen = seq;
                    return Next::Send(text);
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    crate::metrics::ops_resynced();
                    return Next::Send(self.snapshot().await);
                }
                Err(broadcast::error::RecvError::Closed) => return Next::Closed,
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.feed.watchers.fetch_sub(1, Ordering::AcqRel);
    }
}
