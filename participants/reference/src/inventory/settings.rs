//! The inventory's configuration: the shared sections and `[inventory]`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{self, Consumer, Load, Metrics, Nats, Streams, Telemetry};
use crate::faults::Faults;
use crate::service;

/// The inventory's own settings (section `[inventory]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Settings {
    /// The KV bucket.
    pub bucket: String,
    /// Products seeded on first start: sku → units. Existing products are never overwritten.
    pub catalogue: BTreeMap<String, u64>,
    /// `inventory.stock.low` is published when available stock drops below this.
    pub low_stock_threshold: u64,
    /// Most operations folded into one write of a product record.
    pub max_batch: usize,
    /// How long a final reservation (committed, rejected, released) is kept; then its key
    /// expires. A reserve stored longer ago than 90 % of it is refused (`command_expired`), so
    /// a very late reserve can never find the record gone and hold stock again. At least 1 s
    /// and at least `consumer.reply-ttl`.
    #[serde(with = "config::duration")]
    pub record_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            bucket: "jetsaga_inventory".to_owned(),
            catalogue: (1..=5).map(|i| (format!("sku-{i}"), 10_000_000)).collect(),
            low_stock_threshold: 100,
            max_batch: 256,
            record_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// The configuration of `jetsaga-inventory`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Config {
    /// NATS connection.
    pub nats: Nats,
    /// Storage, replicas and retention of the streams and the bucket (as the orchestrator's).
    pub streams: Streams,
    /// The command consumer.
    pub consumer: Consumer,
    /// The metrics endpoint (default `127.0.0.1:9101`).
    pub metrics: Metrics,
    /// Logs and traces.
    pub telemetry: Telemetry,
    /// Injected failures.
    pub faults: Faults,
    /// Stock settings.
    pub inventory: Settings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: Nats::default(),
            streams: Streams::default(),
            consumer: Consumer::default(),
            metrics: Metrics::on_port(9101),
            telemetry: Telemetry::default(),
            faults: Faults::default(),
            inventory: Settings::default(),
        }
    }
}

impl Load for Config {
    fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }
}

impl config::Validate for Config {
    fn validate(&self) -> Result<(), config::Error> {
        self.nats.validate()?;
        self.streams.validate()?;
        self.consumer.validate(&self.streams)?;
        self.metrics.validate()?;
        self.telemetry.validate()?;
        self.faults.validate()?;
        let s = &self.inventory;
        service::validate_bucket("inventory.bucket", &s.bucket)?;
        if let Some(sku) = s.catalogue.keys().find(|k| !service::is_key_safe(k)) {
            return Err(config::Error::field(
                "inventory.catalogue",
                format!("sku {sku:?} must be letters, digits, -, _, = or /"),
            ));
        }
        service::validate_record_ttl(
            "inventory.record-ttl",
            s.record_ttl,
            self.consumer.reply_ttl,
        )?;
        if s.max_batch == 0 {
            return Err(config::Error::field(
                "inventory.max-batch",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}
