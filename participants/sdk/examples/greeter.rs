//! A participant in a few lines: `greeter` answers `saga.cmd.greeter.greet`.
//!
//! Run a JetStream server (`nats-server -js`), then `cargo run -p jetsaga-participant --example
//! greeter`; stop it with Ctrl-C. A saga step with `participant = "greeter"` and
//! `action = "greet"` now gets its replies from here.

use jetsaga_participant::{Context, Handled, Participant};
use serde::Deserialize;

/// The part of the saga's input this participant needs.
#[derive(Deserialize)]
struct Input {
    customer_id: String,
}

async fn greet(ctx: Context) -> Handled {
    let input: Input = match ctx.input() {
        Ok(input) => input,
        Err(invalid) => return invalid,
    };
    if input.customer_id.is_empty() {
        // A business failure: the saga compensates the steps already done.
        return Handled::failed("no_customer", "customer_id is empty");
    }
    // Effects must be safe to apply twice (keyed by the saga id): a crash between the effect
    // and the reply makes JetStream deliver the command again.
    Handled::ok(serde_json::json!({ "greeting": format!("hello {}", input.customer_id) }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let client = async_nats::connect(url).await?;
    Participant::builder("greeter")
        .handler("greet", greet)
        .handler("ungreet", |_ctx: Context| async {
            Handled::ok(serde_json::Value::Null)
        })
        .build()?
        .run(client, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
