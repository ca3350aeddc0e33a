//! The records in the bucket, how they are keyed, and the invariants that tie them together.

use std::collections::{BTreeMap, BTreeSet};

use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::Error;

/// A product record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// Units that can be reserved.
    pub available: u64,
    /// Units sold (committed reservations).
    pub sold: u64,
    /// Units held per saga (reservations not committed or released yet).
    #[serde(default)]
    pub holds: BTreeMap<String, Hold>,
}

impl Product {
    /// Units held by reservations.
    pub fn reserved(&self) -> u64 {
        self.holds.values().map(|h| h.quantity).sum()
    }

    /// `available + reserved + sold`: constant for a product.
    pub fn total(&self) -> u64 {
        self.available + self.reserved() + self.sold
    }
}

/// The units one saga holds of a product, and the reserve attempts that hold them.
///
/// Every attempt of a saga's reserve holds the same units, so the hold counts them once; the
/// attempts are a reference count. An attempt that finds another attempt's reservation takes
/// only itself out, and the units go back when no attempt is left, so two attempts never
/// remove each other's holds. A commit sells the hold only if it names the attempt the
/// reservation confirms, so a hold a late attempt adds after the sale is never sold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "HoldRecord")]
pub struct Hold {
    /// Units held.
    pub quantity: u64,
    /// The reserve attempts that hold them (empty for holds written by earlier versions).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub attempts: BTreeSet<u64>,
}

/// A hold as stored: an object, or a bare quantity written by earlier versions.
#[derive(Deserialize)]
#[serde(untagged)]
enum HoldRecord {
    Units(u64),
    Hold {
        quantity: u64,
        #[serde(default)]
        attempts: BTreeSet<u64>,
    },
}

impl From<HoldRecord> for Hold {
    fn from(record: HoldRecord) -> Self {
        match record {
            HoldRecord::Units(quantity) => Self {
                quantity,
                attempts: BTreeSet::new(),
            },
            HoldRecord::Hold { quantity, attempts } => Self { quantity, attempts },
        }
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

/// A reservation record: the single source of truth for the saga's holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// Where it stands.
    pub status: Status,
    /// The lines, one per product.
    pub items: Vec<Line>,
    /// The reserve attempt whose holds this reservation confirms (absent when written by a
    /// release, a rejection or an earlier version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u64>,
    /// Why it was rejected: `(code, message)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<(String, String)>,
}

/// A way the records disagree with each other, found by [`audit`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A saga holds stock but its reservation is not `reserved` (or has no such line).
    #[error("{sku}: {saga} holds {hold:?} but its reservation is {reservation:?}")]
    StrayHold {
        /// The product.
        sku: String,
        /// The saga holding it.
        saga: String,
        /// The hold.
        hold: Hold,
        /// The saga's reservation, if any.
        reservation: Option<Reservation>,
    },
    /// A `reserved` reservation whose line is not held by the attempt it confirms.
    #[error("{saga}: reserved {line:?}, but the product holds {hold:?}")]
    MissingHold {
        /// The saga.
        saga: String,
        /// The line.
        line: Line,
        /// What the product holds for the saga.
        hold: Option<Hold>,
    },
    /// A product's sold units differ from the sum of the committed lines.
    #[error("{sku}: sold {sold}, but the committed lines add up to {committed}")]
    Sold {
        /// The product.
        sku: String,
        /// Its sold units.
        sold: u64,
        /// The committed reservations' units of it.
        committed: u64,
    },
}

/// Checks the invariants that hold between the records once no command is in flight: every
/// hold belongs to a reservation in state `reserved` (for its line's quantity, held by the
/// attempt it confirms), every `reserved` reservation holds each line, and each product's
/// `sold` is the sum of the committed lines. Conservation (`available + reserved + sold`
/// unchanged) needs the initial stock and is the caller's check.
pub fn audit(
    products: &BTreeMap<String, Product>,
    reservations: &BTreeMap<String, Reservation>,
) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut committed: BTreeMap<&str, u64> = BTreeMap::new();
    for (saga, reservation) in reservations {
        for line in &reservation.items {
            match reservation.status {
                Status::Reserved => {
                    let hold = products.get(&line.sku).and_then(|p| p.holds.get(saga));
                    let confirmed = hold.is_some_and(|h| {
                        h.quantity == line.quantity
                            && reservation.attempt.is_none_or(|a| h.attempts.contains(&a))
                    });
                    if !confirmed {
                        violations.push(Violation::MissingHold {
                            saga: saga.clone(),
                            line: line.clone(),
                            hold: hold.cloned(),
                        });
                    }
                }
                Status::Committed => *committed.entry(&line.sku).or_default() += line.quantity,
                Status::Pending | Status::Rejected | Status::Released => {}
            }
        }
    }
    for (sku, product) in products {
        for (saga, hold) in &product.holds {
            let reservation = reservations.get(saga);
            let belongs = reservation.is_some_and(|r| {
                r.status == Status::Reserved
                    && r.items
                        .iter()
                        .any(|l| &l.sku == sku && l.quantity == hold.quantity)
            });
            if !belongs {
                violations.push(Violation::StrayHold {
                    sku: sku.clone(),
                    saga: saga.clone(),
                    hold: hold.clone(),
                    reservation: reservation.cloned(),
                });
            }
        }
        let want = committed.get(sku.as_str()).copied().unwrap_or(0);
        if product.sold != want {
            violations.push(Violation::Sold {
                sku: sku.clone(),
                sold: product.sold,
                committed: want,
            });
        }
    }
    violations
}

pub(super) fn product_key(sku: &str) -> String {
    format!("product.{sku}")
}

pub(super) fn reservation_key(saga_id: &str) -> String {
    format!("reservation.{saga_id}")
}

/// A record as stored (JSON). An encoding failure is an error, never an empty record.
pub(super) fn encode<T: Serialize>(value: &T) -> Result<Bytes, serde_json::Error> {
    serde_json::to_vec(value).map(Bytes::from)
}

/// All products and reservations in `store`, read from the stream leader, for audits and tests.
///
/// # Errors
///
/// [`Error::Kv`] if the bucket cannot be read.
pub async fn snapshot(
    store: &kv::Store,
) -> Result<(BTreeMap<String, Product>, BTreeMap<String, Reservation>), Error> {
    let values = jetsaga_runtime::kv::values(store)
        .await
        .map_err(|e| Error::Kv(e.to_string()))?;
    let mut products = BTreeMap::new();
    let mut reservations = BTreeMap::new();
    for (key, value) in values {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn holds_of_earlier_versions_still_read() {
        let old: Product =
            serde_json::from_str(r#"{"available":1,"sold":2,"holds":{"s":3}}"#).unwrap();
        assert_eq!(old.holds["s"].quantity, 3);
        assert!(old.holds["s"].attempts.is_empty());
        let new: Product = serde_json::from_slice(
            &encode(&Product {
                holds: [(
                    "s".to_owned(),
                    Hold {
                        quantity: 3,
                        attempts: [7, 9].into(),
                    },
                )]
                .into(),
                ..old
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(new.holds["s"].attempts, [7, 9].into());
        assert_eq!(new.total(), 6);
    }

    #[test]
    fn audit_names_stray_and_missing_holds_and_unbacked_sales() {
        let line = |sku: &str, quantity| Line {
            sku: sku.to_owned(),
            quantity,
        };
        let hold = |quantity, attempt| Hold {
            quantity,
            attempts: [attempt].into(),
        };
        let reservation = |status, attempt, items| Reservation {
            status,
            items,
            attempt,
            failure: None,
        };
        let products: BTreeMap<String, Product> = [(
            "p".to_owned(),
            Product {
                available: 0,
                sold: 5,
                holds: [
                    ("ok".to_owned(), hold(1, 1)),
                    ("late".to_owned(), hold(2, 2)),
                    ("other".to_owned(), hold(1, 3)),
                ]
                .into(),
            },
        )]
        .into();
        let reservations: BTreeMap<String, Reservation> = [
            (
                "ok",
                reservation(Status::Reserved, Some(1), vec![line("p", 1)]),
            ),
            (
                "late",
                reservation(Status::Committed, Some(1), vec![line("p", 2)]),
            ),
            (
                "other",
                reservation(Status::Reserved, Some(4), vec![line("p", 1)]),
            ),
            (
                "gone",
                reservation(Status::Reserved, Some(5), vec![line("p", 1)]),
            ),
        ]
        .map(|(s, r)| (s.to_owned(), r))
        .into();
        let violations = audit(&products, &reservations);
        assert!(
            matches!(&violations[..], [
                Violation::MissingHold { saga: gone, .. },
                Violation::MissingHold { saga: other, .. },
                Violation::StrayHold { saga: late, .. },
                Violation::Sold { sold: 5, committed: 2, .. },
            ] if gone == "gone" && other == "other" && late == "late"),
            "{violations:#?}"
        );
    }
}
