//! Injected failures and latency, for demos and tests.

use std::time::Duration;

use jetsaga_participant::Handled;
use serde::{Deserialize, Serialize};

use crate::config::{Error, duration};

/// How a participant misbehaves on purpose (section `[faults]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Faults {
    /// Share of commands (0 to 1) that fail transiently and are retried.
    pub fail_rate: f64,
    /// Actions that always fail with a retryable error.
    pub fail_actions: Vec<String>,
    /// Latency added to every command.
    #[serde(with = "duration")]
    pub latency: Duration,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            fail_rate: 0.0,
            fail_actions: Vec::new(),
            latency: Duration::ZERO,
        }
    }
}

impl Faults {
    /// Checks the section.
    ///
    /// # Errors
    ///
    /// Naming the invalid field.
    pub fn validate(&self) -> Result<(), Error> {
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return Err(Error::field("faults.fail-rate", "must be between 0 and 1"));
        }
        Ok(())
    }

    /// Waits the configured latency, then says whether `action` fails this time.
    pub async fn inject(&self, action: &str) -> Option<Handled> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.fail_actions.iter().any(|a| a == action) {
            return Some(Handled::retry(
                format!("injected failure: {action} always fails"),
                None,
            ));
        }
        if self.fail_rate > 0.0 && rand::random::<f64>() < self.fail_rate {
            return Some(Handled::retry("injected failure (fail-rate)", None));
        }
        None
    }
}
