//! The plumbing every jetsaga service shares, written once: the orchestrator, the participant
//! SDK and the reference participants all build on it.
//!
//! - [`config`]: defaults → TOML file → `JETSAGA_<SECTION>__<KEY>` → `validate()`, with errors
//!   naming the field and where its value came from; `Duration`s as `250ms`, `90s`, `7d`.
//! - [`nats`]: the `[nats]` section and [`nats::connect`].
//! - [`streams`]: the `[streams]` section; streams and KV buckets created or checked from the
//!   specs in `jetsaga_sagas::streams`.
//! - [`dead_letter`]: one dead-letter format and sanitiser; [`kv`]: record reads and
//!   compare-and-set writes.
//! - [`consume`]: the pull-consume loop with bounded in-flight work, progress marking and a
//!   graceful drain.
//! - [`shutdown`]: SIGINT/SIGTERM; [`telemetry`]: the `[telemetry]` section, logs and OTLP.
//! - [`workers`]: the tokio runtime of every binary (one worker thread unless
//!   `TOKIO_WORKER_THREADS` says otherwise).

pub mod config;
pub mod consume;
pub mod dead_letter;
pub mod kv;
pub mod nats;
pub mod shutdown;
pub mod streams;
pub mod telemetry;
pub mod workers;
