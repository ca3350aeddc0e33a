//! The payment participant: one payment record per saga, in KV.
//!
//! `payment.<saga_id>` holds a [`Payment`] whose [`Status`] is `charged`, `refunded` or
//! `void`. Each effect is one create-or-CAS write of that record, so a command applied twice
//! (redelivery, a new attempt, a crash before the reply) finds the record and changes nothing:
//! - `charge`: absent → `charged` (unless declined: `card_declined`, nothing written);
//!   `charged` → the same ok answer; `refunded`/`void` → `payment_voided`.
//! - `refund`: `charged` → `refunded` (the full charge, never more); absent → `void`, so a
//!   charge arriving late is refused; `refunded`/`void` → ok, no change.
//!
//! [`ledger`] sums the records: balance = charges − refunds.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use jetsaga_participant::{Context, Handled};
use jetsaga_runtime::kv::{self as kv_store, Read};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::config::{self, Consumer, Load, Metrics, Nats, Streams, Telemetry};
use crate::faults::Faults;
use crate::order::Order;
use crate::{Error, service};

/// The participant's name on the wire.
pub const NAME: &str = "payment";

/// The payment's own settings (section `[payment]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Settings {
    /// The KV bucket.
    pub bucket: String,
    /// Charges above this amount (minor units) are declined.
    pub limit_cents: u64,
    /// A card token that is always declined.
    pub decline_token: String,
    /// How long a payment record is kept after its last write; then its key expires. A charge
    /// stored longer ago than 90 % of it is refused (`command_expired`), so a very late charge
    /// never finds the record gone and charges again. A refund must come within it: a refund
    /// of a charge whose record expired finds nothing and refunds nothing, so an operator
    /// retrying a saga parked longer than this checks the ledger by hand. At least 1 s and at
    /// least `consumer.reply-ttl`.
    #[serde(with = "config::duration")]
    pub record_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            bucket: "jetsaga_payment".to_owned(),
            limit_cents: 1_000_000,
            decline_token: "tok_decline".to_owned(),
            record_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The configuration of `jetsaga-payment`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Config {
    /// NATS connection.
    pub nats: Nats,
    /// Storage, replicas and retention of the streams and the bucket (as the orchestrator's).
    pub streams: Streams,
    /// The command consumer.
    pub consumer: Consumer,
    /// The metrics endpoint (default `127.0.0.1:9102`).
    pub metrics: Metrics,
    /// Logs and traces.
    pub telemetry: Telemetry,
    /// Injected failures.
    pub faults: Faults,
    /// Payment rules.
    pub payment: Settings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: Nats::default(),
            streams: Streams::default(),
            consumer: Consumer::default(),
            metrics: Metrics::on_port(9102),
            telemetry: Telemetry::default(),
            faults: Faults::default(),
            payment: Settings::default(),
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
        service::validate_bucket("payment.bucket", &self.payment.bucket)?;
        service::validate_record_ttl(
            "payment.record-ttl",
            self.payment.record_ttl,
            self.consumer.reply_ttl,
        )?;
        if self.payment.limit_cents == 0 {
            return Err(config::Error::field(
                "payment.limit-cents",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// Where a saga's payment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Money taken.
    Charged,
    /// Money given back, all of it.
    Refunded,
    /// Refunded before any charge: a later charge is refused.
    Void,
}

/// A payment record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// Where it stands.
    pub status: Status,
    /// The amount charged (0 for `void`).
    pub amount_cents: u64,
    /// ISO 4217 currency.
    pub currency: String,
    /// Who paid.
    pub customer_id: String,
}

/// Totals over all payment records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Ledger {
    /// Records ever charged (charged or refunded now).
    pub charges: u64,
    /// Money ever charged.
    pub charged_cents: u64,
    /// Refunded records.
    pub refunds: u64,
    /// Money refunded.
    pub refunded_cents: u64,
    /// Void records (refund before any charge).
    pub voids: u64,
}

impl Ledger {
    /// Charges minus refunds.
    pub fn balance_cents(&self) -> i128 {
        i128::from(self.charged_cents) - i128::from(self.refunded_cents)
    }
}

fn key(saga_id: &str) -> String {
    format!("payment.{saga_id}")
}

/// Every payment record in `store`, by saga id, for audits and tests.
///
/// # Errors
///
/// [`Error::Kv`] if the bucket cannot be read.
pub async fn records(
    store: &kv::Store,
) -> Result<std::collections::BTreeMap<String, Payment>, Error> {
    let values = kv_store::values(store)
        .await
        .map_err(|e| Error::Kv(e.to_string()))?;
    let mut out = std::collections::BTreeMap::new();
    for (k, value) in values {
        let Some(saga) = k.strip_prefix("payment.") else {
            continue;
        };
        let payment = serde_json::from_slice(&value).map_err(|e| Error::Kv(format!("{k}: {e}")))?;
        out.insert(saga.to_owned(), payment);
    }
    Ok(out)
}

/// The ledger over every record in `store`.
///
/// # Errors
///
/// [`Error::Kv`] if the bucket cannot be read.
pub async fn ledger(store: &kv::Store) -> Result<Ledger, Error> {
    let mut ledger = Ledger::default();
    for payment in records(store).await?.values() {
        match payment.status {
            Status::Charged => {
                ledger.charges += 1;
                ledger.charged_cents += payment.amount_cents;
            }
            Status::Refunded => {
                ledger.charges += 1;
                ledger.charged_cents += payment.amount_cents;
                ledger.refunds += 1;
                ledger.refunded_cents += payment.amount_cents;
            }
            Status::Void => ledger.voids += 1,
        }
    }
    Ok(ledger)
}

/// Runs the payment participant until `shutdown` resolves.
///
/// # Errors
///
/// When NATS, the bucket, the metrics endpoint or the consumer cannot be set up.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
    let client = service::connect(&config.nats, "jetsaga-payment").await?;
    let registry = prometheus::Registry::new();
    let builder = service::builder(NAME, &config.consumer, &config.streams, registry.clone());
    let js = jetstream::new(client.clone());
    let store = service::bucket(&js, &config.payment.bucket, &config.streams).await?;
    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    if let Some(address) = config.metrics.address() {
        service::serve_metrics(address, registry, &tracker, token.clone()).await?;
    }
    let payments = Arc::new(Payments {
        store,
        js,
        settings: config.payment,
        faults: config.faults,
    });
    let charge = payments.clone();
    let refund = payments.clone();
    let participant = builder
        .handler("charge", move |ctx: Context| {
            let payments = charge.clone();
            async move { payments.charge(ctx).await }
        })
        .handler("refund", move |ctx: Context| {
            let payments = refund.clone();
            async move { payments.refund(ctx).await }
        })
        .build()?;
    let result = participant.run(client, shutdown).await;
    token.cancel();
    tracker.close();
    tracker.wait().await;
    result.map_err(Error::from)
}

struct Payments {
    store: kv::Store,
    js: jetstream::Context,
    settings: Settings,
    faults: Faults,
}

type Step<T> = Result<T, Handled>;

fn transient(what: &str, e: impl std::fmt::Display) -> Handled {
    Handled::retry(format!("{what}: {e}"), None)
}

impl Payments {
    /// Faults, then the saga id and the order, or the reply to give right away.
    async fn prepare(&self, ctx: &Context) -> Step<(String, Order)> {
        if let Some(injected) = self.faults.inject(ctx.action()).await {
            return Err(injected);
        }
        let saga_id = ctx.saga_id().to_owned();
        if !service::is_key_safe(&saga_id) {
            return Err(Handled::failed(
                "invalid_input",
                format!("saga id {saga_id:?} cannot be a key"),
            ));
        }
        Ok((saga_id, ctx.input()?))
    }

    async fn read(&self, saga_id: &str) -> Step<Option<(Payment, u64)>> {
        let Some((value, revision)) = kv_store::entry(&self.store, &key(saga_id), Read::Any)
            .await
            .map_err(|e| transient("reading the payment", e))?
        else {
            return Ok(None);
        };
        let payment = serde_json::from_slice(&value)
            .map_err(|e| Handled::failed("corrupt_state", format!("payment record: {e}")))?;
        Ok(Some((payment, revision)))
    }

    /// Writes `payment` if the record is still at `revision` (`None`: absent); `false` on a
    /// conflict. Every write carries the record TTL.
    async fn write(&self, saga_id: &str, payment: &Payment, revision: Option<u64>) -> Step<bool> {
        let value: Bytes = serde_json::to_vec(payment)
            .map_err(|e| transient("encoding the payment", e))?
            .into();
        let ttl = self.settings.record_ttl;
        kv_store::write_with_ttl(&self.js, &self.store, &key(saga_id), value, revision, ttl)
            .await
            .map(|written| written.is_some())
            .map_err(|e| transient("writing the payment", e))
    }

    async fn charge(&self, ctx: Context) -> Handled {
        let (saga_id, order) = match self.prepare(&ctx).await {
            Ok(prepared) => prepared,
            Err(handled) => return handled,
        };
        // Past the horizon the record may be gone: charging now could charge twice.
        if service::past_horizon(ctx.age(), self.settings.record_ttl) {
            return service::expired(ctx.age(), self.settings.record_ttl);
        }
        match self.try_charge(&saga_id, &order).await {
            Ok(handled) | Err(handled) => handled,
        }
    }

    async fn try_charge(&self, saga_id: &str, order: &Order) -> Step<Handled> {
        let charged = |p: &Payment| {
            Handled::ok(serde_json::json!({
                "charge_id": saga_id, "amount_cents": p.amount_cents, "currency": p.currency,
            }))
        };
        loop {
            match self.read(saga_id).await? {
                Some((p, _)) if p.status == Status::Charged => return Ok(charged(&p)),
                Some(_) => {
                    return Ok(Handled::failed(
                        "payment_voided",
                        "the payment was refunded or voided; it cannot be charged",
                    ));
                }
                None => {
                    if order.card_token == self.settings.decline_token {
                        return Ok(Handled::failed("card_declined", "the card was declined"));
                    }
                    if order.amount_cents > self.settings.limit_cents {
                        return Ok(Handled::failed(
                            "card_declined",
                            format!(
                                "amount {} exceeds the limit of {}",
                                order.amount_cents, self.settings.limit_cents
                            ),
                        ));
                    }
                    let payment = Payment {
                        status: Status::Charged,
                        amount_cents: order.amount_cents,
                        currency: order.currency.clone(),
                        customer_id: order.customer_id.clone(),
                    };
                    if self.write(saga_id, &payment, None).await? {
                        info!(saga_id, amount_cents = order.amount_cents, "charged");
                        return Ok(charged(&payment));
                    }
                }
            }
        }
    }

    async fn refund(&self, ctx: Context) -> Handled {
        let (saga_id, order) = match self.prepare(&ctx).await {
            Ok(prepared) => prepared,
            Err(handled) => return handled,
        };
        match self.try_refund(&saga_id, &order).await {
            Ok(handled) | Err(handled) => handled,
        }
    }

    async fn try_refund(&self, saga_id: &str, order: &Order) -> Step<Handled> {
        loop {
            match self.read(saga_id).await? {
                None => {
                    // Refunding what was never charged changes no money, and refuses a late charge.
                    let void = Payment {
                        status: Status::Void,
                        amount_cents: 0,
                        currency: order.currency.clone(),
                        customer_id: order.customer_id.clone(),
                    };
                    if self.write(saga_id, &void, None).await? {
                        return Ok(Handled::ok(serde_json::json!({ "refunded_cents": 0 })));
                    }
                }
                Some((p, revision)) if p.status == Status::Charged => {
                    let refunded = Payment {
                        status: Status::Refunded,
                        ..p.clone()
                    };
                    if self.write(saga_id, &refunded, Some(revision)).await? {
                        info!(saga_id, amount_cents = p.amount_cents, "refunded");
                        return Ok(Handled::ok(
                            serde_json::json!({ "refunded_cents": p.amount_cents }),
                        ));
                    }
                }
                Some((p, _)) => {
                    let refunded = if p.status == Status::Refunded {
                        p.amount_cents
                    } else {
                        0
                    };
                    return Ok(Handled::ok(
                        serde_json::json!({ "refunded_cents": refunded }),
                    ));
                }
            }
        }
    }
}
