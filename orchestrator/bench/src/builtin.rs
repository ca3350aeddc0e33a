//! `--participants builtin`: trivial inventory and payment participants inside the load
//! generator, so a run measures the engine (orchestrator, nats-server, the SDK's protocol
//! handling) without the reference participants' own storage.
//!
//! They speak the real protocol through the participant SDK (consumers, recorded replies,
//! `Nats-TTL` on replies) but keep no records: every `reserve`, `release`, `commit` and
//! `refund` succeeds, and `charge` declines exactly the orders the load generator marked for
//! decline (`card_token` = `tok_decline`, as the reference payment's rule does), so the run's
//! outcome checks hold unchanged. No `notification` participant runs: nothing the saga waits
//! for consumes its events.

use jetsaga_participant::{Context, Handled, Participant};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Error;

/// Commands each built-in participant handles at once (the reference participants' default
/// is 64 per instance; the engine, not the participant, is what a builtin run measures).
const CONCURRENCY: usize = 512;

/// The card token the load generator gives the orders it wants declined.
const DECLINE_TOKEN: &str = "tok_decline";

/// The running built-in participants; [`Builtin::stop`] ends them.
#[derive(Debug)]
pub struct Builtin {
    token: CancellationToken,
    tasks: TaskTracker,
}

#[derive(Deserialize)]
struct Order {
    card_token: String,
}

async fn ok(_ctx: Context) -> Handled {
    Handled::ok(serde_json::Value::Null)
}

async fn charge(ctx: Context) -> Handled {
    match ctx.input::<Order>() {
        Ok(order) if order.card_token == DECLINE_TOKEN => {
            Handled::failed("card_declined", "the card was declined")
        }
        Ok(_) => Handled::ok(serde_json::json!({ "charged": true })),
        Err(invalid) => invalid,
    }
}

impl Builtin {
    /// Starts `inventory` and `payment` on `client`.
    pub fn start(client: &async_nats::Client) -> Result<Self, Error> {
        let built = |p: Result<Participant, jetsaga_participant::Error>| {
            p.map_err(|e| Error::Io(format!("built-in participant: {e}")))
        };
        let inventory = built(
            Participant::builder("inventory")
                .handler("reserve", ok)
                .handler("release", ok)
                .handler("commit", ok)
                .concurrency(CONCURRENCY)
                .max_ack_pending(CONCURRENCY as i64 * 4)
                .drain_on_shutdown(false)
                .build(),
        )?;
        let payment = built(
            Participant::builder("payment")
                .handler("charge", charge)
                .handler("refund", ok)
                .concurrency(CONCURRENCY)
                .max_ack_pending(CONCURRENCY as i64 * 4)
                .drain_on_shutdown(false)
                .build(),
        )?;
        let (token, tasks) = (CancellationToken::new(), TaskTracker::new());
        for participant in [inventory, payment] {
            let (client, token) = (client.clone(), token.clone());
            tasks.spawn(async move {
                let name = participant.name().to_owned();
                if let Err(e) = participant.run(client, token.cancelled_owned()).await {
                    eprintln!("bench: built-in participant {name} stopped: {e}");
                }
            });
        }
        tasks.close();
        Ok(Self { token, tasks })
    }

    /// Stops both participants and waits for them (commands in flight are left to redelivery).
    pub async fn stop(self) {
        self.token.cancel();
        self.tasks.wait().await;
    }
}
