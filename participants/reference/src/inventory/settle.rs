//! The two ways a reservation ends: `commit` sells its holds, `release` gives them back.

use std::sync::Arc;

use jetsaga_participant::{Context, Handled};
use tracing::info;

use super::records::{Reservation, Status};
use super::stock::{Applied, OpKind};
use super::store::Read;
use super::{Inventory, Step, checked_saga, lines_of, union};

impl Inventory {
    pub(super) async fn release(self: Arc<Self>, ctx: Context) -> Handled {
        match self.try_release(&ctx).await {
            Ok(handled) | Err(handled) => handled,
        }
    }

    /// Marks the record `released` first (creating it if absent, so a late reserve is
    /// refused), then returns every hold of the saga; a redelivery returns what is left.
    async fn try_release(&self, ctx: &Context) -> Step<Handled> {
        let saga_id = checked_saga(ctx)?;
        // The input names the lines even if no reserve ever reached us.
        let input_lines = lines_of(ctx).unwrap_or_default();
        // After a conflict, from the leader: a lagging copy would only conflict again.
        let mut read = Read::Any;
        let lines = loop {
            let known = self.read(saga_id, read).await?;
            read = Read::Leader;
            match known {
                None => {
                    let released = Reservation {
                        status: Status::Released,
                        items: input_lines.clone(),
                        attempt: None,
                        failure: None,
                    };
                    if self.write(saga_id, &released, None).await?.is_some() {
                        break input_lines.clone();
                    }
                }
                // Final states: a stale copy cannot show them early.
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
        // Marked first: a reserve still running sees `released` and drops its own holds.
        self.drop_holds(saga_id, &lines).await?;
        Ok(Handled::ok(serde_json::json!({ "released": lines })))
    }

    pub(super) async fn commit(self: Arc<Self>, ctx: Context) -> Handled {
        match self.try_commit(&ctx).await {
            Ok(handled) | Err(handled) => handled,
        }
    }

    /// Sells the holds of the attempt the reservation confirms, then marks it `committed`.
    async fn try_commit(&self, ctx: &Context) -> Step<Handled> {
        let saga_id = checked_saga(ctx)?;
        let mut remembered = self.recent().take(saga_id);
        let mut read = Read::Any;
        loop {
            let known = match remembered.take() {
                Some(known) => Some(known),
                None => self.read(saga_id, read).await?,
            };
            let Some((record, revision)) = known else {
                if read == Read::Any {
                    // "No reservation" writes nothing: make sure on the leader.
                    read = Read::Leader;
                    continue;
                }
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
                    let attempt = record.attempt;
                    let sold = self
                        .on_all(saga_id, &record.items, |_| OpKind::Sell { attempt })
                        .await?;
                    for (line, applied) in record.items.iter().zip(&sold) {
                        if matches!(applied, Applied::NoHold) {
                            // Sold by an earlier run of this commit, or the hold is another
                            // attempt's: worth a line when sales do not add up.
                            info!(saga_id, sku = %line.sku, ?attempt, "commit: no hold of the reserved attempt to sell");
                        }
                    }
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
                    // A conflict: a lagging copy would only conflict again.
                    read = Read::Leader;
                }
            }
        }
    }
}
