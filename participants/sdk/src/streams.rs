//! The JetStream streams a participant needs.
//!
//! They are created when missing and checked when they exist by
//! [`jetsaga_runtime::streams::ensure_all`], the same function the orchestrator uses, with the
//! same `[streams]` settings, so either may start first.

use jetsaga_sagas::streams::{self as specs, Spec};

pub use jetsaga_runtime::streams::{Storage, Streams, ensure_all as ensure};

/// The streams a participant reads from or writes to.
pub const NEEDED: [&Spec; 4] = [
    &specs::COMMANDS,
    &specs::REPLIES,
    &specs::EVENTS,
    &specs::DEAD_LETTERS,
];
