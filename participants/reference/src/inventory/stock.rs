//! Stock operations and the per-product task that batches them into compare-and-set writes.

use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use tokio::sync::{mpsc, oneshot};

use super::records::{Hold, Line, Product, encode, product_key};
use super::store::{self, Read};
use super::{Inventory, Step, events, transient};

/// How many times one batch is re-applied after CAS conflicts before giving up (transient).
const MAX_CAS_ATTEMPTS: u32 = 64;

/// What one stock operation does to a saga's hold on a product.
#[derive(Debug, Clone, Copy)]
pub(super) enum OpKind {
    /// Reserve attempt `attempt` holds `quantity` (joining the hold if the saga has one).
    Hold { quantity: u64, attempt: u64 },
    /// Attempt `attempt` leaves the hold; the units go back once no attempt is left.
    Leave { attempt: u64 },
    /// The hold goes back to available, whoever holds it (released or rejected reservation).
    Drop,
    /// The hold becomes sold, if `attempt` holds it (`None`: a hold of an earlier version).
    Sell { attempt: Option<u64> },
}

/// What a stock operation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Applied {
    /// The saga holds its units (now or already).
    Held,
    /// Not enough available.
    Insufficient { available: u64 },
    /// The hold was left, returned to available, or turned into sold.
    Removed,
    /// There was nothing to remove or sell.
    NoHold,
    /// No such product.
    UnknownSku,
}

/// Why a stock operation could not be applied; transient (the command is retried). One
/// failed write answers every operation of its batch, so it is cloneable: the sources are
/// shared.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum StockError {
    /// The inventory is stopping: no product task takes new operations.
    #[error("inventory is shutting down")]
    ShuttingDown,
    /// The product's task ended before answering.
    #[error("the task of product {sku} stopped")]
    TaskStopped {
        /// The product.
        sku: String,
    },
    /// The product record could not be read.
    #[error("reading product {sku}: {source}")]
    Read {
        /// The product.
        sku: String,
        /// What the server or client said.
        #[source]
        source: Arc<jetsaga_runtime::kv::Error>,
    },
    /// The stored product record does not decode, or the new one does not encode.
    #[error("product {sku} record: {source}")]
    Record {
        /// The product.
        sku: String,
        /// The JSON error.
        #[source]
        source: Arc<serde_json::Error>,
    },
    /// The product record could not be written (not a conflict: those are retried here).
    #[error("writing product {sku}: {source}")]
    Write {
        /// The product.
        sku: String,
        /// What the server or client said.
        #[source]
        source: Arc<kv::UpdateError>,
    },
    /// Every compare-and-set of the batch lost to another writer.
    #[error("product {sku}: too many concurrent writers")]
    Contended {
        /// The product.
        sku: String,
    },
}

pub(super) struct Op {
    pub(super) kind: OpKind,
    pub(super) saga_id: String,
    pub(super) reply: oneshot::Sender<Result<Applied, StockError>>,
}

impl Op {
    fn apply(&self, product: &mut Product) -> Applied {
        let saga = &self.saga_id;
        match self.kind {
            OpKind::Hold { quantity, attempt } => {
                if let Some(hold) = product.holds.get_mut(saga) {
                    hold.attempts.insert(attempt);
                    Applied::Held
                } else if product.available >= quantity {
                    product.available -= quantity;
                    let hold = Hold {
                        quantity,
                        attempts: [attempt].into(),
                    };
                    product.holds.insert(saga.clone(), hold);
                    Applied::Held
                } else {
                    Applied::Insufficient {
                        available: product.available,
                    }
                }
            }
            OpKind::Leave { attempt } => {
                let Some(hold) = product.holds.get_mut(saga) else {
                    return Applied::NoHold;
                };
                if !hold.attempts.remove(&attempt) {
                    return Applied::NoHold;
                }
                if hold.attempts.is_empty() {
                    product.available += hold.quantity;
                    product.holds.remove(saga);
                }
                Applied::Removed
            }
            OpKind::Drop => match product.holds.remove(saga) {
                Some(hold) => {
                    product.available += hold.quantity;
                    Applied::Removed
                }
                None => Applied::NoHold,
            },
            // A hold the confirmed attempt is not in was added after the sale by a late
            // attempt, which takes it back itself.
            OpKind::Sell { attempt } => match product.holds.get(saga) {
                Some(hold) if attempt.is_none_or(|a| hold.attempts.contains(&a)) => {
                    product.sold += hold.quantity;
                    product.holds.remove(saga);
                    Applied::Removed
                }
                Some(_) | None => Applied::NoHold,
            },
        }
    }
}

impl Inventory {
    /// Runs `kind` for `saga_id` on `sku` in that product's task.
    async fn op(&self, sku: &str, saga_id: &str, kind: OpKind) -> Result<Applied, StockError> {
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
            return Err(StockError::ShuttingDown);
        }
        answer.await.map_err(|_| StockError::TaskStopped {
            sku: sku.to_owned(),
        })?
    }

    /// Runs `kind` on every line at once; the first error is transient.
    pub(super) async fn on_all(
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

    /// Applies `batch` in one compare-and-set write. A batch that changes nothing ("no hold",
    /// "not enough stock", "no such product") writes nothing that a compare-and-set could
    /// reject, so that decision is only taken on a copy just read from the stream leader: a
    /// cached copy or a lagging replica could hide a hold and leak it forever.
    async fn apply(
        &self,
        key: &str,
        batch: &[Op],
        known: &mut Option<(Product, u64)>,
    ) -> Result<Vec<Applied>, StockError> {
        let mut read = Read::Any;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let from_leader = known.is_none() && read == Read::Leader;
            let Some((current, revision)) = (match known.take() {
                Some(k) => Some(k),
                None => self.read(key, read).await?,
            }) else {
                if from_leader {
                    return Ok(vec![Applied::UnknownSku; batch.len()]);
                }
                read = Read::Leader;
                continue;
            };
            let mut next = current.clone();
            let results: Vec<Applied> = batch.iter().map(|op| op.apply(&mut next)).collect();
            if next == current {
                if from_leader {
                    *known = Some((current, revision));
                    return Ok(results);
                }
                read = Read::Leader;
                continue;
            }
            let value = encode(&next).map_err(|e| StockError::Record {
                sku: self.sku.clone(),
                source: Arc::new(e),
            })?;
            match self.store.update(key, value, revision).await {
                Ok(new_revision) => {
                    let saga_id = batch.last().map_or("", |op| op.saga_id.as_str());
                    events::announce(
                        &self.js,
                        &self.sku,
                        self.threshold,
                        (&current, &next),
                        new_revision,
                        saga_id,
                    )
                    .await;
                    *known = Some((next, new_revision));
                    return Ok(results);
                }
                Err(e) if jetsaga_runtime::kv::is_conflict(&e) => {
                    read = Read::Any;
                }
                Err(e) => {
                    return Err(StockError::Write {
                        sku: self.sku.clone(),
                        source: Arc::new(e),
                    });
                }
            }
        }
        Err(StockError::Contended {
            sku: self.sku.clone(),
        })
    }

    async fn read(&self, key: &str, read: Read) -> Result<Option<(Product, u64)>, StockError> {
        let Some((value, revision)) =
            store::entry(&self.store, key, read)
                .await
                .map_err(|e| StockError::Read {
                    sku: self.sku.clone(),
                    source: Arc::new(e),
                })?
        else {
            return Ok(None);
        };
        let product = serde_json::from_slice(&value).map_err(|e| StockError::Record {
            sku: self.sku.clone(),
            source: Arc::new(e),
        })?;
        Ok(Some((product, revision)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn op(saga: &str, kind: OpKind) -> Op {
        Op {
            kind,
            saga_id: saga.to_owned(),
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn attempts_share_a_hold_and_a_sale_needs_the_confirmed_attempt() {
        let mut p = Product {
            available: 5,
            ..Product::default()
        };
        let hold = |attempt| OpKind::Hold {
            quantity: 2,
            attempt,
        };
        assert_eq!(op("s", hold(1)).apply(&mut p), Applied::Held);
        assert_eq!(op("s", hold(2)).apply(&mut p), Applied::Held);
        assert_eq!((p.available, p.reserved()), (3, 2), "held once");
        // The first attempt leaves; the second still holds the units.
        assert_eq!(
            op("s", OpKind::Leave { attempt: 1 }).apply(&mut p),
            Applied::Removed
        );
        assert_eq!(
            op("s", OpKind::Leave { attempt: 1 }).apply(&mut p),
            Applied::NoHold
        );
        assert_eq!((p.available, p.reserved()), (3, 2));
        // A commit of another attempt sells nothing and keeps the hold.
        let sell = |attempt| OpKind::Sell {
            attempt: Some(attempt),
        };
        assert_eq!(op("s", sell(1)).apply(&mut p), Applied::NoHold);
        assert_eq!(p.reserved(), 2);
        assert_eq!(op("s", sell(2)).apply(&mut p), Applied::Removed);
        assert_eq!((p.available, p.reserved(), p.sold), (3, 0, 2));
        // A late attempt after the sale holds anew; the commit's retry does not sell it,
        // and the late attempt's leave gives it back.
        assert_eq!(op("s", hold(3)).apply(&mut p), Applied::Held);
        assert_eq!(op("s", sell(2)).apply(&mut p), Applied::NoHold);
        assert_eq!(
            op("s", OpKind::Leave { attempt: 3 }).apply(&mut p),
            Applied::Removed
        );
        assert_eq!((p.available, p.reserved(), p.sold), (3, 0, 2));
        // A drop takes the hold back whoever holds it.
        assert_eq!(op("t", hold(4)).apply(&mut p), Applied::Held);
        assert_eq!(op("t", hold(5)).apply(&mut p), Applied::Held);
        assert_eq!(op("t", OpKind::Drop).apply(&mut p), Applied::Removed);
        assert_eq!(op("t", OpKind::Drop).apply(&mut p), Applied::NoHold);
        assert_eq!((p.available, p.reserved(), p.sold), (3, 0, 2));
        assert_eq!(
            op(
                "u",
                OpKind::Hold {
                    quantity: 4,
                    attempt: 6
                }
            )
            .apply(&mut p),
            Applied::Insufficient { available: 3 }
        );
    }
}
