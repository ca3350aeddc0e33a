//! The tokio runtime every jetsaga binary runs on.
//!
//! One worker thread by default: a service's hot path is one task (the orchestrator's driver,
//! a participant's consume loop), and on the 2-core machine the benchmarks run on a second
//! worker mostly added cross-thread wake-ups — against two, one worker gave ~9 % more
//! throughput at saturation and an ~11 % lower p99 at 500 sagas/s (README, Performance).
//! Scale out with more instances; `TOKIO_WORKER_THREADS` (tokio's own variable) sets another
//! count for a binary that has cores of its own.

use tokio::runtime::Runtime;

/// The variable that overrides the count (the one tokio reads when a count is not set).
pub const VARIABLE: &str = "TOKIO_WORKER_THREADS";

/// Worker threads when [`VARIABLE`] is not set.
pub const DEFAULT: usize = 1;

/// The most worker threads accepted.
pub const MAX: usize = 1024;

/// Why the runtime could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// [`VARIABLE`] is not a count in 1..=[`MAX`].
    #[error("{VARIABLE}={value:?} is not a number of worker threads from 1 to {MAX}")]
    Count {
        /// The value found.
        value: String,
    },
    /// The operating system refused the threads.
    #[error("cannot start the runtime: {0}")]
    Start(#[from] std::io::Error),
}

impl Error {
    /// The exit code of a binary whose runtime could not be built: 64 (sysexits `EX_USAGE`,
    /// as for a bad configuration) for a bad count, 1 when the threads cannot be started.
    pub fn exit_code(&self) -> std::process::ExitCode {
        match self {
            Self::Count { .. } => std::process::ExitCode::from(64),
            Self::Start(_) => std::process::ExitCode::FAILURE,
        }
    }
}

/// The worker count `value` (the variable's value, if set) asks for.
///
/// # Errors
///
/// [`Error::Count`] when it is not a whole number from 1 to [`MAX`].
pub fn count(value: Option<&str>) -> Result<usize, Error> {
    let Some(value) = value else {
        return Ok(DEFAULT);
    };
    match value.trim().parse::<usize>() {
        Ok(n) if (1..=MAX).contains(&n) => Ok(n),
        _ => Err(Error::Count {
            value: value.to_owned(),
        }),
    }
}

/// A multi-thread runtime with [`count`]`(value)` workers, I/O and time enabled.
///
/// # Errors
///
/// [`Error::Count`] for a bad `value`, [`Error::Start`] when the threads cannot be started.
pub fn runtime(value: Option<&str>) -> Result<Runtime, Error> {
    let workers = count(value)?;
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?)
}

/// [`runtime`] with the value of [`VARIABLE`] in this process's environment (for `main`).
///
/// # Errors
///
/// As [`runtime`]; a value that is not UTF-8 is a bad count.
pub fn from_env() -> Result<Runtime, Error> {
    match std::env::var(VARIABLE) {
        Ok(value) => runtime(Some(&value)),
        Err(std::env::VarError::NotPresent) => runtime(None),
        Err(std::env::VarError::NotUnicode(value)) => Err(Error::Count {
            value: value.to_string_lossy().into_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_default_parse_and_refuse_what_is_not_a_count() {
        assert_eq!(count(None).unwrap(), DEFAULT);
        assert_eq!(count(Some("4")).unwrap(), 4);
        assert_eq!(count(Some(" 2 ")).unwrap(), 2);
        assert_eq!(count(Some("1024")).unwrap(), MAX);
        for bad in ["", "0", "-1", "two", "1.5", "1025", "99999999999999999999"] {
            let e = count(Some(bad)).unwrap_err();
            assert!(matches!(e, Error::Count { .. }), "{bad}: {e}");
            let text = e.to_string();
            assert!(
                text.contains(VARIABLE) && text.contains(&format!("{bad:?}")),
                "{text}"
            );
        }
    }

    #[test]
    fn the_runtime_has_the_workers_asked_for() {
        for (value, workers) in [(None, DEFAULT), (Some("3"), 3)] {
            let rt = runtime(value).unwrap();
            assert_eq!(rt.metrics().num_workers(), workers);
            assert_eq!(rt.block_on(async { 40 + 2 }), 42);
        }
        assert!(matches!(runtime(Some("0")), Err(Error::Count { .. })));
    }
}
