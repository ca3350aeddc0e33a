//! The SDK's error type.

/// Why a participant could not start or keep running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A builder setting is out of range.
    #[error("invalid participant setting: {0}")]
    Config(String),
    /// A stream could be neither found nor created, or exists with other settings.
    #[error(transparent)]
    Stream(#[from] jetsaga_runtime::streams::Error),
    /// The durable consumer could not be created or consumed.
    #[error("consumer {consumer}: {reason}")]
    Consumer {
        /// The consumer's name.
        consumer: String,
        /// What the server or client said.
        reason: String,
    },
    /// The metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}
