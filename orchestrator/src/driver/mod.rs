//! The driver: the only code that runs sagas against JetStream.
//!
//! It is split the way quinn splits quinn-proto from its connection driver:
//!
//! - [`core`] is the scheduler, with no I/O: it owns every saga this instance
//!   holds in memory (one slot each: the cached state and the inputs queued
//!   behind the one in progress), applies inputs with the pure [`Saga::apply`],
//!   and returns what must be done as data ([`core::Io`]: load, write, publish,
//!   set a timer, settle a message, dead-letter it, answer a caller). Time is
//!   passed in. Inputs for one saga are applied one at a time, in arrival order;
//!   different sagas proceed concurrently.
//! - [`plan`] turns a transition's actions into what it writes (pure).
//! - [`executor`] is the thin task that carries the requests out with async-nats,
//!   thousands of futures in flight, and feeds their outcomes back to the core.
//!
//! A transition's write is, in this order: arm the timer if it must move
//! earlier, append the journal record with optimistic concurrency, publish its
//! commands and events, clear the timer if the saga needs none; only when
//! JetStream acknowledged all of it is the input acked. A conflict (another
//! instance was first) reloads the saga and re-applies the input.
//!
//! [`Saga::apply`]: jetsaga_sagas::Saga::apply

pub(crate) mod core;
pub(crate) mod executor;
pub(crate) mod plan;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};

pub use jetsaga_sagas::protocol::saga_id;

use crate::store;

/// A saga was started (`created`) or already existed for its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The saga.
    pub saga_id: String,
    /// False when the key had already started this saga.
    pub created: bool,
}

/// What kind of refusal or failure a call met; callers branch on this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or names something that cannot exist.
    BadRequest,
    /// No such saga or saga type.
    NotFound,
    /// The saga's state does not allow it.
    Conflict,
    /// NATS did not answer in time; the call may be retried.
    Timeout,
    /// NATS or the journal failed, or the orchestrator is stopping; the call may
    /// be retried.
    Unavailable,
}

/// Why a call was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// No such saga type.
    #[error("unknown saga type \"{0}\"")]
    UnknownType(String),
    /// The start input failed validation.
    #[error("{0}")]
    InvalidInput(String),
    /// No such saga.
    #[error("saga {0} not found")]
    NotFound(String),
    /// The saga's state does not allow it.
    #[error("{0}")]
    NotAllowed(String),
    /// A start older than the key horizon, whose key has no saga (any it
    /// started may have expired): not started again.
    #[error("{0}")]
    KeyHorizon(String),
    /// The orchestrator is stopping.
    #[error("the orchestrator is shutting down")]
    ShuttingDown,
    /// Admission control holds new starts (more sagas under way than the system finishes in
    /// `engine.admission-window`, or a stream near its byte bound), saying why. Retry later.
    #[error("overloaded: {0}")]
    Overloaded(Arc<str>),
    /// NATS or the journal failed; the call may be retried.
    #[error("unavailable")]
    Unavailable(#[source] Arc<Error>),
}

impl ApiError {
    /// What kind of refusal this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ApiError::UnknownType(_) | ApiError::NotFound(_) => ErrorKind::NotFound,
            ApiError::InvalidInput(_) => ErrorKind::BadRequest,
            ApiError::NotAllowed(_) | ApiError::KeyHorizon(_) => ErrorKind::Conflict,
            ApiError::ShuttingDown | ApiError::Overloaded(_) => ErrorKind::Unavailable,
            ApiError::Unavailable(e) => match e.kind() {
                IoErrorKind::Timeout => ErrorKind::Timeout,
                IoErrorKind::Conflict
                | IoErrorKind::Corrupt
                | IoErrorKind::NotLoaded
                | IoErrorKind::Unavailable => ErrorKind::Unavailable,
                IoErrorKind::TooLarge => ErrorKind::BadRequest,
            },
        }
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError::Unavailable(Arc::new(error))
    }
}

impl PartialEq for ApiError {
    /// Refusals compare by their text; failures are equal only to themselves.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ApiError::UnknownType(a), ApiError::UnknownType(b))
            | (ApiError::InvalidInput(a), ApiError::InvalidInput(b))
            | (ApiError::NotFound(a), ApiError::NotFound(b))
            | (ApiError::NotAllowed(a), ApiError::NotAllowed(b)) => a == b,
            (ApiError::Overloaded(a), ApiError::Overloaded(b)) => a == b,
            (ApiError::ShuttingDown, ApiError::ShuttingDown) => true,
            (ApiError::Unavailable(a), ApiError::Unavailable(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// What kind of I/O failure a saga's work had; settle decisions branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoErrorKind {
    /// Another instance wrote the saga first.
    Conflict,
    /// A journal record cannot be read or written.
    Corrupt,
    /// The saga's definition version is not loaded on this instance.
    NotLoaded,
    /// NATS did not answer in time.
    Timeout,
    /// NATS refused or the connection failed.
    Unavailable,
    /// What must be written is larger than the server's `max_payload`: it never
    /// will be, so the input that caused it is dead-lettered.
    TooLarge,
}

/// Why a saga's I/O failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The journal failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// A command or event could not be published.
    #[error("cannot publish to {subject}")]
    Publish {
        /// Where it was going.
        subject: String,
        /// Why.
        #[source]
        source: PublishError,
    },
    /// The saga's timer could not be armed or cleared.
    #[error("cannot set the timer of saga {saga_id}")]
    Timer {
        /// The saga.
        saga_id: String,
        /// Why.
        #[source]
        source: PublishError,
    },
    /// The replies stream could not be asked for a stored reply.
    #[error("cannot look for the reply on {subject}")]
    FindReply {
        /// The reply's subject.
        subject: String,
        /// Why.
        #[source]
        source: async_nats::jetstream::stream::DirectGetError,
    },
    /// A bug: the driver's bookkeeping went wrong.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The saga runs a definition version this instance does not have.
    #[error("definition {saga_type} version {version} is not loaded")]
    NotLoaded {
        /// The saga type.
        saga_type: String,
        /// Its version.
        version: u32,
    },
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> IoErrorKind {
        let publish = |e: &PublishError| match e.kind() {
            PublishErrorKind::TimedOut => IoErrorKind::Timeout,
            PublishErrorKind::MaxPayloadExceeded => IoErrorKind::TooLarge,
            _ => IoErrorKind::Unavailable,
        };
        match self {
            Error::Store(e) => match e.kind() {
                store::ErrorKind::Conflict => IoErrorKind::Conflict,
                store::ErrorKind::Corrupt => IoErrorKind::Corrupt,
                store::ErrorKind::Timeout => IoErrorKind::Timeout,
                store::ErrorKind::Unavailable => IoErrorKind::Unavailable,
                store::ErrorKind::TooLarge => IoErrorKind::TooLarge,
            },
            Error::Publish { source, .. } | Error::Timer { source, .. } => publish(source),
            Error::FindReply { source, .. } => match source.kind() {
                async_nats::jetstream::stream::DirectGetErrorKind::TimedOut => IoErrorKind::Timeout,
                _ => IoErrorKind::Unavailable,
            },
            Error::NotLoaded { .. } => IoErrorKind::NotLoaded,
            Error::Internal(_) => IoErrorKind::Unavailable,
        }
    }
}

/// Which consumer a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Replies,
    Starts,
    Timers,
}

impl Source {
    /// The source named in its dead letters' subject.
    pub(crate) fn dead_letter_source(self) -> &'static str {
        match self {
            Source::Replies => "orchestrator.replies",
            Source::Starts => "orchestrator.starts",
            Source::Timers => "orchestrator.timers",
        }
    }
}

/// How long a saga may sit in memory without input. Another instance may have
/// moved it on (active-active), so an idle copy is dropped and reloaded when needed.
pub(crate) const IDLE_EVICTION: Duration = Duration::from_secs(15);
