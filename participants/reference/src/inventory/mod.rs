//! The inventory participant: stock per product and a reservation per saga, in KV.
//!
//! # State (bucket `jetsaga_inventory` by default)
//!
//! - `product.<sku>`: [`Product`] `{available, sold, holds: {saga_id: {quantity, attempts}}}`.
//!   The reserved stock is the sum of the holds, so `available + reserved + sold` never
//!   changes. A saga holds a product at most once; every reserve attempt of the saga that
//!   holds it is named in the hold (a reference count, see [`Hold`]).
//! - `reservation.<saga_id>`: [`Reservation`] with a [`Status`] (`reserved → committed`, or
//!   `rejected` / `released`) and, once reserved, the attempt whose holds it confirms. It is
//!   the single source of truth: a hold counts only while its saga's reservation is
//!   `reserved` and names an attempt in the hold ([`audit`] checks exactly this).
//!
//! There are no multi-key transactions, so the order of writes carries the safety:
//! - `reserve` (one attempt, with a fresh random id) joins or creates the holds, then creates
//!   the record `reserved` naming itself (or `rejected` on a shortage, and then drops every
//!   hold of the saga). An attempt that finds a record it did not write takes back only its
//!   own share when the record is `reserved` (another attempt's holds stay), and drops every
//!   hold of the saga when the record is final (`committed`, `rejected`, `released`): nothing
//!   can hold for it any more. A `reserved` record naming the attempt itself is its own
//!   create whose answer was lost (async-nats's `create` then reports the key as existing):
//!   the holds stay.
//! - `release` first marks the record `released` (creating it if absent, so a late `reserve`
//!   is refused), then drops the holds; a redelivery drops what is left.
//! - `commit` sells the holds that name the reservation's attempt, then marks the record
//!   `committed`; a hold a late attempt adds after the sale is never sold.
//!
//! Every product record is written with CAS on its revision (other instances write too).
//! Inside one process each product has one task that batches the pending operations into one
//! CAS write, so a hot product costs one write per batch rather than one per order. A
//! decision that writes nothing ("no hold", "no reservation") is taken on a read from the
//! stream leader, never on a cached copy or a direct get a lagging replica may answer.
//!
//! Modules: `settings` (the configuration), `records` (the records, [`snapshot`] and
//! [`audit`]), `store` (reads and CAS writes), `stock` (stock operations and the per-product
//! task), `events` (stock events), `reserve`, and `settle` (commit and release).

mod events;
mod records;
mod reserve;
mod settings;
mod settle;
mod stock;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::{self, kv};
use jetsaga_participant::{Context, Handled};
use jetsaga_sagas::protocol;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::faults::Faults;
use crate::order::Order;
use crate::{Error, service};

pub use events::{STOCK_DEPLETED, STOCK_LOW};
pub use records::{Hold, Line, Product, Reservation, Status, Violation, audit, snapshot};
pub use settings::{Config, Settings};

use records::{encode, product_key};
use store::Recent;

/// The participant's name on the wire.
pub const NAME: &str = "inventory";

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
    let client = service::connect(&config.nats, "jetsaga-inventory").await?;
    let registry = prometheus::Registry::new();
    let participant_builder =
        service::builder(NAME, &config.consumer, &config.streams, registry.clone());
    let js = jetstream::new(client.clone());
    let store = service::bucket(&js, &config.inventory.bucket, &config.streams).await?;
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
        let value = encode(&product).map_err(|e| Error::Kv(format!("encoding {sku}: {e}")))?;
        match store.create(product_key(sku), value).await {
            Ok(_) => info!(%sku, units, "seeded product"),
            Err(e)
                if e.kind() == kv::CreateErrorKind::AlreadyExists
                    || jetsaga_runtime::kv::is_conflict(&e) => {}
            Err(e) => return Err(Error::Kv(format!("seeding {sku}: {e}"))),
        }
    }
    Ok(())
}

/// The participant's shared state.
struct Inventory {
    store: kv::Store,
    js: jetstream::Context,
    settings: Settings,
    faults: Faults,
    /// One task per product, fed through its channel.
    products: Mutex<HashMap<String, mpsc::UnboundedSender<stock::Op>>>,
    /// Reservations this process just wrote, so the commit that usually follows
    /// skips a read; a stale entry only costs a failed compare-and-set and a re-read.
    recent: Mutex<Recent>,
    tracker: TaskTracker,
    pause: Option<Pause>,
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
