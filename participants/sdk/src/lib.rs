//! The jetsaga participant SDK.
//!
//! A participant is a service that runs saga steps: it consumes commands from
//! `saga.cmd.<participant>.<action>` and answers each on its reply subject. This crate does
//! everything around the business logic, so a participant is a name and a few handlers:
//!
//! - the streams (created if missing, checked if present) and the durable pull consumer
//!   `participant-<name>`;
//! - many commands in flight at once (configurable concurrency and `max_ack_pending`);
//! - idempotency on the command id: a command whose reply is already recorded in the reply
//!   stream gets that reply again and the handler does not run; each reply is recorded with a
//!   `Nats-TTL` ([`Builder::reply_ttl`], 1 h by default), after which the handler's own
//!   idempotent effects answer;
//! - acks: a reply is published and its PubAck awaited before the command is acked; a short
//!   `ack_wait` (2 s by default) brings a crashed instance's commands back quickly, and handlers
//!   running longer are marked in progress;
//!   [`Handled::Retry`] naks with a delay, and on the last delivery records a retryable
//!   `retries_exhausted` failure; a panicking handler counts as a retry;
//! - undecodable commands are terminated and copied to the dead-letter stream
//!   (`jetsaga_runtime::dead_letter`);
//! - the `traceparent` header becomes the parent of the handler's span and travels back
//!   on the reply;
//! - Prometheus metrics ([`metrics`]);
//! - graceful shutdown: stop pulling, finish what is in flight, drain.
//!
//! Modules: [`handler`] (what handlers get and return), [`streams`] (the streams it needs),
//! [`trace`] (trace context in headers), [`metrics`], [`error`]. The consume loop, stream
//! checks and dead letters are `jetsaga_runtime`'s.
//!
//! ```no_run
//! use jetsaga_participant::{Context, Handled, Participant};
//!
//! async fn reserve(ctx: Context) -> Handled {
//!     // The command id is the SDK's idempotency key; the saga id is a natural key for
//!     // the business effect, which must be safe to apply again after a crash.
//!     Handled::ok(serde_json::json!({ "reserved_for": ctx.saga_id() }))
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let participant = Participant::builder("inventory")
//!     .handler("reserve", reserve)
//!     .handler("release", |_ctx: Context| async { Handled::ok(serde_json::Value::Null) })
//!     .concurrency(128)
//!     .build()?;
//! participant.run(client, async { tokio::signal::ctrl_c().await.unwrap_or(()) }).await?;
//! # Ok(()) }
//! ```

pub mod error;
pub mod handler;
pub mod metrics;
mod participant;
pub mod streams;
pub mod trace;

pub use error::Error;
pub use handler::{Context, Handled};
pub use metrics::Metrics;
pub use participant::{Builder, DEFAULT_ACK_WAIT, DEFAULT_REPLY_TTL, Participant};
