//! The stock events a product write crosses into.

use std::time::Duration;

use async_nats::jetstream;
use jetsaga_sagas::protocol::{self, Body, Event, header, subject};
use tracing::warn;

use super::records::Product;

/// Emitted when a product's available stock drops below the threshold.
pub const STOCK_LOW: &str = "inventory.stock.low";
/// Emitted when a product's available stock reaches zero.
pub const STOCK_DEPLETED: &str = "inventory.stock.depleted";

/// The events a write from `before` to `after` crosses into.
fn crossed(threshold: u64, before: &Product, after: &Product) -> Vec<&'static str> {
    let mut events = Vec::new();
    if before.available >= threshold && after.available < threshold {
        events.push(STOCK_LOW);
    }
    if before.available > 0 && after.available == 0 {
        events.push(STOCK_DEPLETED);
    }
    events
}

/// The `Nats-Msg-Id` of `event` crossed by the write that made `revision` of the product: a
/// retry of one crossing is deduplicated, a later crossing to the same level is not.
fn msg_id(event: &str, sku: &str, revision: u64) -> String {
    format!("{event}:{sku}:{revision}")
}

/// Publishes the stock events the write of `revision` (`before` → `after`) crossed into,
/// naming `saga_id` as the saga whose reservation crossed the line. Best effort: a lost event
/// is logged.
pub(super) async fn announce(
    js: &jetstream::Context,
    sku: &str,
    threshold: u64,
    (before, after): (&Product, &Product),
    revision: u64,
    saga_id: &str,
) {
    for name in crossed(threshold, before, after) {
        warn!(%sku, available = after.available, event = name, "stock event");
        let event = Event {
            protocol: protocol::VERSION,
            event: name.to_owned(),
            saga_id: saga_id.to_owned(),
            saga_type: String::new(),
            key: sku.to_owned(),
            input: serde_json::json!({
                "sku": sku, "available": after.available, "threshold": threshold,
            }),
            occurred_at: chrono::Utc::now(),
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(header::MSG_ID, msg_id(name, sku, revision));
        let published = js
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
            warn!(%sku, event = name, "cannot publish the stock event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossings_and_their_ids() {
        let at = |available| Product {
            available,
            ..Product::default()
        };
        assert_eq!(crossed(20, &at(25), &at(15)), [STOCK_LOW]);
        assert_eq!(crossed(20, &at(20), &at(0)), [STOCK_LOW, STOCK_DEPLETED]);
        assert_eq!(crossed(20, &at(5), &at(0)), [STOCK_DEPLETED]);
        assert!(crossed(20, &at(15), &at(10)).is_empty());
        assert!(crossed(20, &at(0), &at(25)).is_empty());
        assert_ne!(msg_id(STOCK_LOW, "p", 3), msg_id(STOCK_LOW, "p", 7));
    }
}
