//! The actors that carry the core's decisions out: one matcher per node and
//! one actor per driver. They own the connections, timers and Redis calls
//! that the state machines in [`crate::core`] leave out, and nothing else.

pub mod driver;
pub mod matcher;
pub mod messages;
pub mod registry;
pub mod remote;
