//! The inventory participant: stock per product and a reservation per saga, in KV.
//!
//! # State (bucket `jetsaga_inventory` by default)
//!
//! - `product.<sku>`: [`Product`] `{available, sold, holds: {saga_id: qty}}`. The reserved
//!   stock is the sum of the holds, so `available + reserved + sold` never changes. Holds are
//!   keyed by saga, which makes every stock operation idempotent: holding twice for one saga
//!   holds once.
//! - `reservation.<saga_id>`: [`Reservation`] with a [`Status`]
//!   (`pending → reserved → committed`, or `rejected` / `released`).
//!
//! There are no multi-key transactions, so the order of writes carries the safety:
//! - `reserve` creates the record `pending`, applies the holds, then moves it `pending →
//!   reserved` by CAS. If the record became `released` or `rejected` meanwhile, it removes its
//!   holds. A redelivered `reserve` finds the record and finishes the earlier attempt.
//! - `release` first marks the record `released` (creating it if absent, so a late `reserve`
//!   is refused), then removes the holds; a redelivery removes what is left.
//! - insufficient stock marks the record `rejected` first, then removes the holds.
//! - `commit` turns the saga's holds into sold stock, then marks the record `committed`.
//!
//! Every product record is written with CAS on its revision (other instances write too).
//! Inside one process each product has one task that batches the pending operations into one
//! CAS write, so a hot product costs one write per batch rather than one per order.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use jetsaga_participant::{Context, Handled};
use jetsaga_sagas::order::Order;
use jetsaga_sagas::protocol::{self, Body, Event, header, subject};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{self, Consumer, Load, Metrics, Nats, Telemetry};
use crate::faults::Faults;
use crate::{Error, service};

/// The participant's name on the wire.
pub const NAME: &str = "inventory";
/// Emitted when a product's available stock drops below the threshold.
pub const STOCK_LOW: &str = "inventory.stock.low";
/// Emitted when a product's available stock reaches zero.
pub const STOCK_DEPLETED: &str = "inventory.stock.depleted";
/// How many times one batch is re-applied after CAS conflicts before giving up (transient).
const MAX_CAS_ATTEMPTS: u32 = 64;

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
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            bucket: "jetsaga_inventory".to_owned(),
            catalogue: (1..=5).map(|i| (format!("sku-{i}"), 10_000_000)).collect(),
            low_stock_threshold: 100,
            max_batch: 256,
        }
    }
}

/// The configuration of `jetsaga-inventory`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Config {
    /// NATS connection.
    pub nats: Nats,
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

    fn validate(&self) -> Result<(), config::Error> {
        self.nats.validate()?;
        self.consumer.validate()?;
        self.metrics.validate()?;
        self.telemetry.validate()?;
        self.faults.validate()?;
        let s = &self.inventory;
        if !service::is_key_safe(&s.bucket) || s.bucket.contains('.') {
            return Err(config::Error::field(
                "inventory.bucket",
                "must be letters, digits, - or _",
            ));
        }
        if let Some(sku) = s.catalogue.keys().find(|k| !service::is_key_safe(k)) {
            return Err(config::Error::field(
                "inventory.catalogue",
                format!("sku {sku:?} must be letters, digits, -, _, = or /"),
            ));
        }
        if s.max_batch == 0 {
            return Err(config::Error::field(
                "inventory.max-batch",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// A product record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// Units that can be reserved.
    pub available: u64,
    /// Units sold (committed reservations).
    pub sold: u64,
    /// Units held per saga (reservations not committed or released yet).
    #[serde(default)]
    pub holds: BTreeMap<String, u64>,
}

impl Product {
    /// Units held by reservations.
    pub fn reserved(&self) -> u64 {
        self.holds.values().sum()
    }

    /// `available + reserved + sold`: constant for a product.
    pub fn total(&self) -> u64 {
        self.available + self.reserved() + self.sold
    }
}

/// Where a saga's reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// A reserve is applying holds (written by earlier versions; read for compatibility).
    Pending,
    /// All holds are applied.
    Reserved,
    /// The holds became sold stock.
    Committed,
    /// Not enough stock (or an unknown product): no holds remain.
    Rejected,
    /// Compensated: no holds remain, and a late reserve is refused.
    Released,
}

/// One product line of a reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// The product.
    pub sku: String,
    /// Units.
    pub quantity: u64,
}

/// A reservation record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// Where it stands.
    pub status: Status,
    /// The lines, one per product.
    pub items: Vec<Line>,
    /// Why it was rejected: `(code, message)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<(String, String)>,
}

fn product_key(sku: &str) -> String {
    format!("product.{sku}")
}

fn reservation_key(saga_id: &str) -> String {
    format!("reservation.{saga_id}")
}

/// All products and reservations in `store`, for audits and tests.
///
/// # Errors
///
/// [`Error::Kv`] if the bucket cannot be read.
pub async fn snapshot(
    store: &kv::Store,
) -> Result<(BTreeMap<String, Product>, BTreeMap<String, Reservation>), Error> {
    use futures::TryStreamExt;
    let keys: Vec<String> = store
        .keys()
        .await
        .map_err(|e| Error::Kv(e.to_string()))?
        .try_collect()
        .await
        .map_err(|e| Error::Kv(e.to_string()))?;
    let mut products = BTreeMap::new();
    let mut reservations = BTreeMap::new();
    for key in keys {
        let Some(value) = store
            .get(&key)
            .await
            .map_err(|e| Error::Kv(e.to_string()))?
        else {
            continue;
        };
        if let Some(sku) = key.strip_prefix("product.") {
            let product =
                serde_json::from_slice(&value).map_err(|e| Error::Kv(format!("{key}: {e}")))?;
            products.insert(sku.to_owned(), product);
        } else if let Some(saga) = key.strip_prefix("reservation.") {
            let reservation =
                serde_json::from_slice(&value).map_err(|e| Error::Kv(format!("{key}: {e}")))?;
            reservations.insert(saga.to_owned(), reservation);
        }
    }
    Ok((products, reservations))
}

/// Runs the inventory until `shutdown` resolves.
///
/// # Errors
///
/// When NATS, the bucket, the metrics endpoint or the consumer cannot be set up.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
    run_with(config, None, shutdown).await
}

/// A point inside a reserve where a test can hold the attempt (see [`run_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Point {
    /// The attempt has its input and has written nothing yet.
    BeforeHolds,
    /// The attempt's stock operations have all answered; it has not decided yet.
    AfterHolds,
}

/// A test seam: awaited at every [`Point`] of every reserve, with the command.
pub type Pause =
    Arc<dyn Fn(Point, &protocol::Command) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// [`run`], with `pause` awaited at each [`Point`] of every reserve: tests use it to force the
/// interleavings of two attempts that production only sees under crashes and redeliveries.
///
/// # Errors
///
/// As [`run`].
pub async fn run_with(
    config: Config,
    pause: Option<Pause>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let client = config.nats.connect("jetsaga-inventory").await?;
    let registry = prometheus::Registry::new();
    let participant_builder =
        service::builder(NAME, &config.consumer, &config.nats, registry.clone());
    let js = jetstream::new(client.clone());
    let store = service::bucket(&js, &config.inventory.bucket, config.nats.replicas).await?;
    seed(&store, &config.inventory.catalogue).await?;

    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    if let Some(address) = config.metrics.address() {
        service::serve_metrics(address, registry, &tracker, token.clone()).await?;
    }
    let inventory = Arc::new(Inventory {
        store,
        js,
        settings: config.inventory,
        faults: config.faults,
        products: Mutex::new(HashMap::new()),
        recent: Mutex::new(Recent::default()),
        tracker: tracker.clone(),
        pause,
    });
    let participant = participant_builder
        .handler("reserve", handler(&inventory, Inventory::reserve))
        .handler("release", handler(&inventory, Inventory::release))
        .handler("commit", handler(&inventory, Inventory::commit))
        .build()?;
    let result = participant.run(client, shutdown).await;
    // Product tasks end once their channels close.
    inventory.close();
    token.cancel();
    tracker.close();
    tracker.wait().await;
    result.map_err(Error::from)
}

fn handler<F, Fut>(
    inventory: &Arc<Inventory>,
    f: F,
) -> impl Fn(Context) -> futures::future::BoxFuture<'static, Handled> + Send + Sync + 'static
where
    F: Fn(Arc<Inventory>, Context) -> Fut + Send + Sync + Copy + 'static,
    Fut: Future<Output = Handled> + Send + 'static,
{
    let inventory = inventory.clone();
    move |ctx: Context| {
        let inventory = inventory.clone();
        Box::pin(async move {
            if let Some(injected) = inventory.faults.inject(ctx.action()).await {
                return injected;
            }
            f(inventory, ctx).await
        })
    }
}

async fn seed(store: &kv::Store, catalogue: &BTreeMap<String, u64>) -> Result<(), Error> {
    for (sku, units) in catalogue {
        let product = Product {
            available: *units,
            ..Product::default()
        };
        match store.create(product_key(sku), encode(&product)).await {
            Ok(_) => info!(%sku, units, "seeded product"),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::Kv(format!("seeding {sku}: {e}"))),
        }
    }
    Ok(())
}

fn encode<T: Serialize>(value: &T) -> Bytes {
    serde_json::to_vec(value).unwrap_or_default().into()
}

/// What one stock operation does to a product.
#[derive(Debug, Clone, Copy)]
enum OpKind {
    Hold(u64),
    Unhold,
    Sell,
}

/// What a stock operation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    /// The saga holds its units (now or already).
    Held,
    /// Not enough available.
    Insufficient { available: u64 },
    /// The saga's hold was returned to available, or turned into sold.
    Removed,
    /// The saga held nothing here.
    NoHold,
    /// No such product.
    UnknownSku,
}

struct Op {
    kind: OpKind,
    saga_id: String,
    reply: oneshot::Sender<Result<Applied, String>>,
}

impl Op {
    fn apply(&self, product: &mut Product) -> Applied {
        match self.kind {
            OpKind::Hold(quantity) => {
                if product.holds.contains_key(&self.saga_id) {
                    Applied::Held
                } else if product.available >= quantity {
                    product.available -= quantity;
                    product.holds.insert(self.saga_id.clone(), quantity);
                    Applied::Held
                } else {
                    Applied::Insufficient {
                        available: product.available,
                    }
                }
            }
            OpKind::Unhold => match product.holds.remove(&self.saga_id) {
                Some(quantity) => {
                    product.available += quantity;
                    Applied::Removed
                }
                None => Applied::NoHold,
            },
            OpKind::Sell => match product.holds.remove(&self.saga_id) {
                Some(quantity) => {
                    product.sold += quantity;
                    Applied::Removed
                }
                None => Applied::NoHold,
            },
        }
    }
}

/// The participant's shared state.
struct Inventory {
    store: kv::Store,
    js: jetstream::Context,
    settings: Settings,
    faults: Faults,
    /// One task per product, fed through its channel.
    products: Mutex<HashMap<String, mpsc::UnboundedSender<Op>>>,
    /// Reservations this process just wrote, so the commit that usually follows
    /// skips a read; a stale entry only costs a failed compare-and-set and a re-read.
    recent: Mutex<Recent>,
    tracker: TaskTracker,
    pause: Option<Pause>,
}

/// A bounded map of recently written reservations (oldest evicted first).
#[derive(Default)]
struct Recent {
    entries: HashMap<String, (Reservation, u64)>,
    order: std::collections::VecDeque<String>,
}

impl Recent {
    const CAPACITY: usize = 65_536;

    fn insert(&mut self, saga_id: &str, record: Reservation, revision: u64) {
        if self
            .entries
            .insert(saga_id.to_owned(), (record, revision))
            .is_none()
        {
            self.order.push_back(saga_id.to_owned());
        }
        while self.order.len() > Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
    }

    fn take(&mut self, saga_id: &str) -> Option<(Reservation, u64)> {
        // The key stays in `order` until it ages out; removing it there would be O(n).
        self.entries.remove(saga_id)
    }
}

/// The outcome of a step inside a handler: `Err` is the reply to give now.
type Step<T> = Result<T, Handled>;

fn transient(what: &str, e: impl std::fmt::Display) -> Handled {
    Handled::retry(format!("{what}: {e}"), None)
}

impl Inventory {
    async fn pause(&self, point: Point, ctx: &Context) {
        if let Some(pause) = &self.pause {
            pause(point, ctx.command()).await;
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn close(&self) {
        self.products
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Runs `kind` for `saga_id` on `sku` in that product's task.
    async fn op(&self, sku: &str, saga_id: &str, kind: OpKind) -> Result<Applied, String> {
        let (reply, answer) = oneshot::channel();
        let op = Op {
            kind,
            saga_id: saga_id.to_owned(),
            reply,
        };
        let sent = {
            let mut products = self
                .products
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let sender = products.entry(sku.to_owned()).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                let task = ProductTask {
                    sku: sku.to_owned(),
                    store: self.store.clone(),
                    js: self.js.clone(),
                    threshold: self.settings.low_stock_threshold,
                    max_batch: self.settings.max_batch,
                };
                self.tracker.spawn(task.run(rx));
                tx
            });
            sender.send(op).is_ok()
        };
        if !sent {
            return Err("inventory is shutting down".to_owned());
        }
        answer
            .await
            .map_err(|_| "product task stopped".to_owned())?
    }

    /// Runs `kind` on every line at once; the first error is transient.
    async fn on_all(
        &self,
        saga_id: &str,
        lines: &[Line],
        kind: impl Fn(&Line) -> OpKind,
    ) -> Step<Vec<Applied>> {
        let results =
            futures::future::join_all(lines.iter().map(|l| self.op(&l.sku, saga_id, kind(l))))
                .await;
        results
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| transient("stock update failed", e))
    }

    async fn read(&self, saga_id: &str) -> Step<Option<(Reservation, u64)>> {
        match self.store.entry(reservation_key(saga_id)).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                let reservation = serde_json::from_slice(&entry.value).map_err(|e| {
                    Handled::failed("corrupt_state", format!("reservation record: {e}"))
                })?;
                Ok(Some((reservation, entry.revision)))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(transient("reading the reservation", e)),
        }
    }

    /// Writes `reservation` if the record is still at `revision` (`None`: absent) and returns
    /// the new revision; `None` on a conflict (re-read and decide again).
    async fn write(
        &self,
        saga_id: &str,
        reservation: &Reservation,
        revision: Option<u64>,
    ) -> Step<Option<u64>> {
        let key = reservation_key(saga_id);
        let written = match revision {
            None => match self.store.create(&key, encode(reservation)).await {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(e.to_string()),
            },
            Some(revision) => match self.store.update(&key, encode(reservation), revision).await {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(e.to_string()),
            },
        };
        written.map_err(|e| transient("writing the reservation", e))
    }

    async fn remove_holds(&self, saga_id: &str, lines: &[Line]) -> Step<()> {
        self.on_all(saga_id, lines, |_| OpKind::Unhold)
            .await
            .map(|_| ())
    }

    async fn reserve(self: Arc<Self>, ctx: Context) -> Handled {
        match self.try_reserve(&ctx).await {
            Ok(handled) | Err(handled) => handled,
        }
    }

    async fn try_reserve(&self, ctx: &Context) -> Step<Handled> {
        let saga_id = checked_saga(ctx)?;
        let lines = lines_of(ctx)?;
        let reserved = |items: &[Line]| Handled::ok(serde_json::json!({ "reserved": items }));
        self.pause(Point::BeforeHolds, ctx).await;
        // Holds first (keyed by saga, so a repeat changes nothing), then the record is
        // created in its final state: two writes and no read on the common path. A
        // release marks the record released *before* removing holds, so whichever of
        // the two comes second sees the other and the holds never outlive a release.
        let applied = self
            .on_all(saga_id, &lines, |l| OpKind::Hold(l.quantity))
            .await?;
        self.pause(Point::AfterHolds, ctx).await;
        let shortage = lines.iter().zip(&applied).find_map(|(line, a)| match a {
            Applied::Insufficient { available } => Some((
                "insufficient_stock",
                format!(
                    "insufficient stock for {}: {} requested, {available} available",
                    line.sku, line.quantity
                ),
            )),
            Applied::UnknownSku => Some(("unknown_sku", format!("unknown sku {}", line.sku))),
            _ => None,
        });
        let outcome = match &shortage {
            Some((code, message)) => {
                // All-or-nothing: the holds this attempt did get go back first.
                self.remove_holds(saga_id, &lines).await?;
                Reservation {
                    status: Status::Rejected,
                    items: lines.clone(),
                    failure: Some(((*code).to_owned(), message.clone())),
                }
            }
            None => Reservation {
                status: Status::Reserved,
                items: lines.clone(),
                failure: None,
            },
        };
        if let Some(revision) = self.write(saga_id, &outcome, None).await? {
            if shortage.is_some() {
                info!(saga_id, "reservation rejected");
                return Ok(refusal(&outcome));
            }
            self.recent().insert(saga_id, outcome, revision);
            return Ok(reserved(&lines));
        }
        // A record exists already: an earlier attempt, or a release that came first.
        loop {
            let Some((record, revision)) = self.read(saga_id).await? else {
                return Err(transient("reservation", "record vanished"));
            };
            match record.status {
                Status::Reserved | Status::Committed => return Ok(reserved(&record.items)),
                Status::Rejected | Status::Released => {
                    self.remove_holds(saga_id, &union(&record.items, &lines))
                        .await?;
                    return Ok(refusal(&record));
                }
                Status::Pending => {
                    // Left by an older version that wrote a pending record first.
                    if self
                        .write(saga_id, &outcome, Some(revision))
                        .await?
                        .is_some()
                    {
                        return Ok(match shortage {
                            Some(_) => refusal(&outcome),
                            None => reserved(&lines),
                        });
                    }
                }
            }
        }
    }

    async fn release(self: Arc<Self>, ctx: Context) -> Handled {
        match self.try_release(&ctx).await {
            Ok(handled) | Err(handled) => handled,
        }
    }

    async fn try_release(&self, ctx: &Context) -> Step<Handled> {
        let saga_id = checked_saga(ctx)?;
        // The input names the lines even if no reserve ever reached us.
        let input_lines = lines_of(ctx).unwrap_or_default();
        let lines = loop {
            match self.read(saga_id).await? {
                None => {
                    let released = Reservation {
                        status: Status::Released,
                        items: input_lines.clone(),
                        failure: None,
                    };
                    if self.write(saga_id, &released, None).await?.is_some() {
                        break input_lines.clone();
                    }
                }
                Some((r, _)) if r.status == Status::Committed => {
                    return Ok(Handled::failed(
                        "already_committed",
                        "the reservation is committed and can no longer be released",
                    ));
                }
                Some((r, _)) if r.status == Status::Released => {
                    break union(&r.items, &input_lines);
                }
                Some((r, rev)) => {
                    let released = Reservation {
                        status: Status::Released,
                        ..r.clone()
                    };
                    if self.write(saga_id, &released, Some(rev)).await?.is_some() {
                        break union(&r.items, &input_lines);
                    }
                }
            }
        };
        // Marked first: a reserve still running sees `released` and removes its own holds.
        self.remove_holds(saga_id, &lines).await?;
        Ok(Handled::ok(serde_json::json!({ "released": lines })))
    }

    async fn commit(self: Arc<Self>, ctx: Context) -> Handled {
        match self.try_commit(&ctx).await {
            Ok(handled) | Err(handled) => handled,
        }
    }

    async fn try_commit(&self, ctx: &Context) -> Step<Handled> {
        let saga_id = checked_saga(ctx)?;
        let mut remembered = self.recent().take(saga_id);
        loop {
            let known = match remembered.take() {
                Some(known) => Some(known),
                None => self.read(saga_id).await?,
            };
            let Some((record, revision)) = known else {
                return Ok(Handled::failed(
                    "unknown_reservation",
                    format!("no reservation for saga {saga_id}"),
                ));
            };
            match record.status {
                Status::Committed => {
                    return Ok(Handled::ok(
                        serde_json::json!({ "committed": record.items }),
                    ));
                }
                Status::Pending => {
                    return Ok(Handled::retry("the reservation is still pending", None));
                }
                Status::Rejected | Status::Released => {
                    return Ok(Handled::failed(
                        "reservation_released",
                        "the reservation was released or rejected; nothing to commit",
                    ));
                }
                Status::Reserved => {
                    // Idempotent: a hold already sold is simply gone.
                    self.on_all(saga_id, &record.items, |_| OpKind::Sell)
                        .await?;
                    let committed = Reservation {
                        status: Status::Committed,
                        ..record.clone()
                    };
                    if self
                        .write(saga_id, &committed, Some(revision))
                        .await?
                        .is_some()
                    {
                        return Ok(Handled::ok(
                            serde_json::json!({ "committed": record.items }),
                        ));
                    }
                }
            }
        }
    }
}

fn refusal(record: &Reservation) -> Handled {
    match (&record.status, &record.failure) {
        (Status::Rejected, Some((code, message))) => Handled::failed(code.clone(), message.clone()),
        _ => Handled::failed("reservation_released", "the reservation was released"),
    }
}

fn checked_saga(ctx: &Context) -> Step<&str> {
    let saga_id = ctx.saga_id();
    if service::is_key_safe(saga_id) {
        Ok(saga_id)
    } else {
        Err(Handled::failed(
            "invalid_input",
            format!("saga id {saga_id:?} cannot be a key"),
        ))
    }
}

/// The order's lines, one per sku (duplicates summed), sorted.
fn lines_of(ctx: &Context) -> Step<Vec<Line>> {
    let order: Order = ctx.input()?;
    let mut lines: BTreeMap<String, u64> = BTreeMap::new();
    for item in &order.items {
        if !service::is_key_safe(&item.sku) || item.quantity == 0 {
            return Err(Handled::failed(
                "invalid_input",
                format!("invalid item {}", item.sku),
            ));
        }
        *lines.entry(item.sku.clone()).or_default() += u64::from(item.quantity);
    }
    if lines.is_empty() {
        return Err(Handled::failed("invalid_input", "the order has no items"));
    }
    Ok(lines
        .into_iter()
        .map(|(sku, quantity)| Line { sku, quantity })
        .collect())
}

fn union(a: &[Line], b: &[Line]) -> Vec<Line> {
    let mut all: BTreeMap<&str, &Line> = BTreeMap::new();
    for line in a.iter().chain(b) {
        all.entry(&line.sku).or_insert(line);
    }
    all.into_values().cloned().collect()
}

/// The task that owns one product's writes inside this process.
struct ProductTask {
    sku: String,
    store: kv::Store,
    js: jetstream::Context,
    threshold: u64,
    max_batch: usize,
}

impl ProductTask {
    async fn run(self, mut ops: mpsc::UnboundedReceiver<Op>) {
        let key = product_key(&self.sku);
        // The last value and revision we know; a CAS conflict means someone else wrote.
        let mut known: Option<(Product, u64)> = None;
        while let Some(first) = ops.recv().await {
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match ops.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let outcome = self.apply(&key, &batch, &mut known).await;
            for (i, op) in batch.into_iter().enumerate() {
                let answer = match &outcome {
                    Ok(results) => Ok(results.get(i).copied().unwrap_or(Applied::UnknownSku)),
                    Err(e) => Err(e.clone()),
                };
                let _ = op.reply.send(answer);
            }
        }
    }

    async fn apply(
        &self,
        key: &str,
        batch: &[Op],
        known: &mut Option<(Product, u64)>,
    ) -> Result<Vec<Applied>, String> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let cached = known.is_some();
            let (current, revision) = match known.take() {
                Some(k) => k,
                None => match self.store.entry(key).await {
                    Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                        let product: Product = serde_json::from_slice(&entry.value)
                            .map_err(|e| format!("product {}: {e}", self.sku))?;
                        (product, entry.revision)
                    }
                    Ok(_) => return Ok(vec![Applied::UnknownSku; batch.len()]),
                    Err(e) => return Err(format!("reading product {}: {e}", self.sku)),
                },
            };
            let mut next = current.clone();
            let results: Vec<Applied> = batch.iter().map(|op| op.apply(&mut next)).collect();
            if next == current {
                if cached {
                    // Nothing to write according to the cache, but another instance
                    // may have changed the product since: a "no hold" read from a
                    // stale copy would let a commit or release skip a real hold.
                    continue;
                }
                *known = Some((current, revision));
                return Ok(results);
            }
            match self.store.update(key, encode(&next), revision).await {
                Ok(new_revision) => {
                    self.announce(&current, &next, batch).await;
                    *known = Some((next, new_revision));
                    return Ok(results);
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return Err(format!("writing product {}: {e}", self.sku)),
            }
        }
        Err(format!("product {}: too many concurrent writers", self.sku))
    }

    /// Publishes the stock events a write crossed into.
    async fn announce(&self, before: &Product, after: &Product, batch: &[Op]) {
        let mut events = Vec::new();
        if before.available >= self.threshold && after.available < self.threshold {
            events.push(STOCK_LOW);
        }
        if before.available > 0 && after.available == 0 {
            events.push(STOCK_DEPLETED);
        }
        let saga_id = batch
            .last()
            .map(|op| op.saga_id.clone())
            .unwrap_or_default();
        for name in events {
            warn!(sku = %self.sku, available = after.available, event = name, "stock event");
            let event = Event {
                protocol: protocol::VERSION,
                event: name.to_owned(),
                saga_id: saga_id.clone(),
                saga_type: String::new(),
                key: self.sku.clone(),
                input: serde_json::json!({
                    "sku": self.sku, "available": after.available, "threshold": self.threshold,
                }),
                occurred_at: chrono::Utc::now(),
            };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                header::MSG_ID,
                format!("{name}:{}:{}", self.sku, after.available),
            );
            let published = self
                .js
                .publish_with_headers(subject::event(name), headers, event.encode().into())
                .await;
            let acked = match published {
                Ok(ack) => tokio::time::timeout(Duration::from_secs(5), ack)
                    .await
                    .map(|r| r.is_ok())
                    .unwrap_or(false),
                Err(_) => false,
            };
            if !acked {
                warn!(sku = %self.sku, event = name, "cannot publish the stock event");
            }
        }
    }
}
