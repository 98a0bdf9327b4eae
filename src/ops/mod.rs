//! The live operations map: `/ws/ops` feeds `/ops` with every driver of this
//! node (coloured by what it is doing), the open requests, recent matches and
//! the key counts.
//!
//! Bounded and cheap for the engine by construction: driver actors record
//! their newest state on the [`Board`](board::Board) (one map write, only
//! when what the map shows changed); a publisher turns what changed into one
//! batch at most every [`BATCH_INTERVAL`](feed::BATCH_INTERVAL), serialised
//! once for every watcher; nothing is recorded for batches while nobody
//! watches. A watcher too slow for the batches is sent a fresh snapshot
//! instead of a growing backlog.

pub mod board;
pub mod feed;
pub mod session;

pub use board::{Board, DriverDot, DriverShow};
pub use feed::OpsFeed;
