//! `reserve`: hold every line or none, then create the reservation in its final state.

use std::sync::Arc;

use jetsaga_participant::{Context, Handled};
use tracing::info;

use super::records::{Line, Reservation, Status};
use super::stock::{Applied, OpKind};
use super::store::Read;
use super::{Inventory, Point, Step, checked_saga, lines_of, refusal, transient, union};
use crate::service;

/// An id for one run of a reserve handler, unique across instances and deliveries (random,
/// 53 bits so that any JSON reader keeps it exact).
fn new_attempt() -> u64 {
    rand::random::<u64>() >> 11
}

fn reserved(items: &[Line]) -> Handled {
    Handled::ok(serde_json::json!({ "reserved": items }))
}

impl Inventory {
    pub(super) async fn reserve(self: Arc<Self>, ctx: Context) -> Handled {
        match self.try_reserve(&ctx).await {
            Ok(handled) | Err(handled) => handled,
        }
    }

    async fn try_reserve(&self, ctx: &Context) -> Step<Handled> {
        let saga_id = checked_saga(ctx)?;
        let lines = lines_of(ctx)?;
        self.pause(Point::BeforeHolds, ctx).await;
        // Past the horizon the saga's final record may be gone: holding now could leak.
        if service::past_horizon(ctx.age(), self.settings.record_ttl) {
            return Ok(service::expired(ctx.age(), self.settings.record_ttl));
        }
        // Holds first, joined by this attempt's id, then the record is created in its final
        // state naming the attempt: two writes and no read on the common path. Whatever
        // else runs meanwhile (another attempt, a release, a commit), the attempt that
        // finds a record it did not write takes back only its own share of the holds.
        let attempt = new_attempt();
        let applied = self
            .on_all(saga_id, &lines, |l| OpKind::Hold {
                quantity: l.quantity,
                attempt,
            })
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
            Applied::Held | Applied::Removed | Applied::NoHold => None,
        });
        let outcome = match &shortage {
            // All or nothing: the record says so first, then every hold of the saga goes.
            Some((code, message)) => Reservation {
                status: Status::Rejected,
                items: lines.clone(),
                attempt: None,
                failure: Some(((*code).to_owned(), message.clone())),
            },
            None => Reservation {
                status: Status::Reserved,
                items: lines.clone(),
                attempt: Some(attempt),
                failure: None,
            },
        };
        let mut revision = None;
        loop {
            if let Some(written) = self.write(saga_id, &outcome, revision).await? {
                if shortage.is_some() {
                    self.drop_holds(saga_id, &lines).await?;
                    info!(saga_id, "reservation rejected");
                    return Ok(refusal(&outcome));
                }
                self.recent().insert(saga_id, outcome, written);
                return Ok(reserved(&lines));
            }
            // A record exists already: an earlier attempt's, or a release that came first.
            // Leader read: the answer below may write nothing.
            let Some((record, current)) = self.read(saga_id, Read::Leader).await? else {
                return Err(transient("reservation", "record vanished"));
            };
            match record.status {
                // This attempt's own record: its create landed but the answer was lost (a
                // leader change, a dropped connection), and async-nats's `create` then finds
                // the key and reports it as existing. The holds are the reservation's.
                Status::Reserved if record.attempt == Some(attempt) => {
                    info!(
                        saga_id,
                        attempt, "reserve: the record found is this attempt's own"
                    );
                    self.recent().insert(saga_id, record.clone(), current);
                    return Ok(reserved(&record.items));
                }
                Status::Reserved => {
                    // Another attempt's holds: leave them, take back this attempt's share.
                    self.on_all(saga_id, &lines, |_| OpKind::Leave { attempt })
                        .await?;
                    return Ok(reserved(&record.items));
                }
                Status::Committed => {
                    // Sold already: any hold of the saga is a late attempt's.
                    self.drop_holds(saga_id, &union(&record.items, &lines))
                        .await?;
                    return Ok(reserved(&record.items));
                }
                Status::Rejected | Status::Released => {
                    self.drop_holds(saga_id, &union(&record.items, &lines))
                        .await?;
                    return Ok(refusal(&record));
                }
                // Left by an older version that wrote a pending record first: finish it.
                Status::Pending => revision = Some(current),
            }
        }
    }

    /// Returns every hold of the saga on `lines` to available, whoever holds it: only for a
    /// reservation that can no longer be (or never was) reserved.
    pub(super) async fn drop_holds(&self, saga_id: &str, lines: &[Line]) -> Step<()> {
        self.on_all(saga_id, lines, |_| OpKind::Drop)
            .await
            .map(|_| ())
    }
}
