//! What a handler receives ([`Context`]) and returns ([`Handled`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use jetsaga_sagas::protocol::Command;
use serde::de::DeserializeOwned;

/// What a handler decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Handled {
    /// The action was applied; `result` is recorded with the saga's step.
    Ok(serde_json::Value),
    /// A business failure: the action was not applied and trying again will not help.
    /// The saga compensates.
    Failed {
        /// Stable, machine-readable code, e.g. `insufficient_stock`.
        code: String,
        /// For humans.
        message: String,
    },
    /// A transient failure: the command is redelivered after `delay` (or the SDK's backoff).
    /// On the last allowed delivery the SDK records a retryable failure instead.
    Retry {
        /// Why, for logs and the eventual failure message.
        reason: String,
        /// How long to wait before the redelivery.
        delay: Option<Duration>,
    },
}

impl Handled {
    /// The action was applied.
    pub fn ok(result: serde_json::Value) -> Self {
        Self::Ok(result)
    }

    /// A business failure with a stable `code`.
    pub fn failed(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Failed {
            code: code.into(),
            message: message.into(),
        }
    }

    /// A transient failure; redeliver after `delay`, or the SDK's backoff if `None`.
    pub fn retry(reason: impl Into<String>, delay: Option<Duration>) -> Self {
        Self::Retry {
            reason: reason.into(),
            delay,
        }
    }
}

/// Failure codes the SDK itself records.
pub mod code {
    /// No handler is registered for the command's action (not retryable).
    pub const UNKNOWN_ACTION: &str = "unknown_action";
    /// The handler kept failing transiently until the last delivery (retryable).
    pub const RETRIES_EXHAUSTED: &str = "retries_exhausted";
    /// The command's input does not fit the handler (not retryable), see [`Context::input`](crate::Context::input).
    pub const INVALID_INPUT: &str = "invalid_input";
}

/// One command as a handler sees it.
#[derive(Debug, Clone)]
pub struct Context {
    pub(crate) command: Command,
    pub(crate) delivered: u32,
    pub(crate) stored_at: Option<std::time::SystemTime>,
    pub(crate) participant: Arc<str>,
    pub(crate) jetstream: jetstream::Context,
}

impl Context {
    /// The decoded command.
    pub fn command(&self) -> &Command {
        &self.command
    }

    /// The saga the command belongs to: the natural key of the business effect.
    pub fn saga_id(&self) -> &str {
        &self.command.saga_id
    }

    /// The action being run.
    pub fn action(&self) -> &str {
        &self.command.action
    }

    /// How many times JetStream has delivered this command, 1 the first time.
    pub fn delivered(&self) -> u32 {
        self.delivered
    }

    /// How long ago the command was stored in the command stream, by this host's clock now
    /// (zero if the server's timestamp is ahead or unknown). A redelivery has the age of the
    /// first delivery; an orchestrator re-send is a new message. Participants whose records
    /// expire use it to refuse a command older than their records' horizon instead of
    /// applying it again.
    pub fn age(&self) -> Duration {
        self.stored_at
            .and_then(|at| std::time::SystemTime::now().duration_since(at).ok())
            .unwrap_or_default()
    }

    /// The participant's name.
    pub fn participant(&self) -> &str {
        &self.participant
    }

    /// The JetStream context the SDK uses (publish-ack window sized for its concurrency),
    /// for KV stores or publishing events.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// The saga's input as `T`; a mismatch is an `invalid_input` business failure, ready to
    /// return: `let order: Order = match ctx.input() { Ok(o) => o, Err(h) => return h };`
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, Handled> {
        T::deserialize(&self.command.input)
            .map_err(|e| Handled::failed(code::INVALID_INPUT, format!("invalid input: {e}")))
    }
}

pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = Handled> + Send + 'static>>;

/// A registered handler, type-erased.
pub(crate) type BoxHandler = Arc<dyn Fn(Context) -> BoxFuture + Send + Sync + 'static>;

pub(crate) fn boxed<F, Fut>(f: F) -> BoxHandler
where
    F: Fn(Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Handled> + Send + 'static,
{
    Arc::new(move |ctx| Box::pin(f(ctx)))
}
