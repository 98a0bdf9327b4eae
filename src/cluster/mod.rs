//! Driver locks shared by several engine nodes, held in Redis.
//!
//! The building blocks of cluster mode (issue 5), not yet wired into the
//! engine: [`redlock`] is the quorum arithmetic, [`store`] the Lua-scripted
//! lock on one Redis server and the Redlock acquisition across several. The
//! lock rules themselves stay in [`crate::lock`]: a driver's actor still
//! refuses any fencing token that is not newer than the last it saw, which is
//! what makes a late node harmless whatever Redis says.

pub mod redlock;
pub mod store;
