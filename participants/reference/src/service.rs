//! What every reference participant does around its logic: the connection, KV buckets, the
//! metrics endpoint.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use axum::Router;
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::Error;
use crate::config::{Nats, Streams};

/// Connects as `name` with the `[nats]` settings.
///
/// # Errors
///
/// [`Error::Connect`] if no server can be reached.
pub async fn connect(nats: &Nats, name: &str) -> Result<async_nats::Client, Error> {
    Ok(jetsaga_runtime::nats::connect(nats, name).await?.client)
}

/// The bucket `name` (one value per key), created with the `[streams]` settings if it does
/// not exist, checked if it does.
///
/// # Errors
///
/// [`Error::Streams`] if it can be neither opened nor created, or has other settings.
pub async fn bucket(
    js: &jetstream::Context,
    name: &str,
    streams: &Streams,
) -> Result<kv::Store, Error> {
    Ok(jetsaga_runtime::streams::ensure_bucket(
        js,
        name,
        "jetsaga reference participant state",
        streams,
    )
    .await?)
}

/// Serves `/metrics` (Prometheus text) and `/healthz` on `listen` until `token` is cancelled;
/// returns the bound address (port 0 picks a free one).
///
/// # Errors
///
/// [`Error::Io`] if the address cannot be bound.
pub async fn serve_metrics(
    listen: SocketAddr,
    registry: prometheus::Registry,
    tracker: &TaskTracker,
    token: CancellationToken,
) -> Result<SocketAddr, Error> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let address = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    prometheus::TextEncoder::new()
                        .encode_to_string(&registry.gather())
                        .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    info!(%address, "serving /metrics");
    tracker.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(token.cancelled_owned())
            .await;
        if let Err(e) = served {
            warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(address)
}

/// Checks that `bucket`, the value of config field `field`, can name a KV bucket.
///
/// # Errors
///
/// A field error naming `field` when it cannot.
pub fn validate_bucket(field: &str, bucket: &str) -> Result<(), crate::config::Error> {
    if is_key_safe(bucket) && !bucket.contains('.') {
        Ok(())
    } else {
        Err(crate::config::Error::field(
            field,
            "must be letters, digits, - or _",
        ))
    }
}

/// Whether a string can be part of a KV key (`[-/_=.a-zA-Z0-9]`, no leading or trailing dot).
pub fn is_key_safe(text: &str) -> bool {
    !text.is_empty()
        && !text.starts_with('.')
        && !text.ends_with('.')
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '/' | '_' | '=' | '.'))
}

/// The failure code of a command refused because it is older than its records' horizon.
pub const COMMAND_EXPIRED: &str = "command_expired";

/// Whether a command (or event) stored `age` ago is past the horizon of records that expire
/// `ttl` after they become final: older than 90 % of it (the rest is slack for clock skew
/// between this host and the server). Such a command may find its saga's final record gone
/// and must not apply its effect again.
pub fn past_horizon(age: Duration, ttl: Duration) -> bool {
    age >= ttl / 10 * 9
}

/// The answer to a command [`past_horizon`]: a business failure, nothing applied.
pub fn expired(age: Duration, ttl: Duration) -> jetsaga_participant::Handled {
    jetsaga_participant::Handled::failed(
        COMMAND_EXPIRED,
        format!(
            "the command was stored {}s ago, past the {}s horizon of this participant's records",
            age.as_secs(),
            ttl.as_secs()
        ),
    )
}

/// Checks a `record-ttl` field: at least 1 s and at least the reply TTL (the records answer
/// repeated commands once the recorded replies are gone).
///
/// # Errors
///
/// A field error naming `field`.
pub fn validate_record_ttl(
    field: &str,
    ttl: Duration,
    reply_ttl: Duration,
) -> Result<(), crate::config::Error> {
    if ttl < Duration::from_secs(1) {
        return Err(crate::config::Error::field(field, "must be at least 1s"));
    }
    if ttl < reply_ttl {
        return Err(crate::config::Error::field(
            field,
            "must be at least the reply TTL (consumer.reply-ttl)",
        ));
    }
    Ok(())
}

/// A participant builder with the shared consumer settings applied.
pub fn builder(
    name: &str,
    consumer: &crate::config::Consumer,
    streams: &Streams,
    registry: prometheus::Registry,
) -> jetsaga_participant::Builder {
    jetsaga_participant::Participant::builder(name)
        .concurrency(consumer.concurrency)
        .max_ack_pending(consumer.max_ack_pending)
        .ack_wait(consumer.ack_wait)
        .max_deliver(consumer.max_deliver)
        .reply_ttl(consumer.reply_ttl)
        .shutdown_grace(consumer.shutdown_grace)
        .streams(streams.clone())
        .registry(registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_horizon_leaves_slack_and_record_ttls_are_checked() {
        let day = Duration::from_secs(86_400);
        assert!(!past_horizon(Duration::from_secs(3600), day));
        assert!(!past_horizon(day / 10 * 8, day));
        assert!(past_horizon(day / 10 * 9, day));
        assert!(past_horizon(2 * day, day));
        let hour = Duration::from_secs(3600);
        assert!(validate_record_ttl("x.record-ttl", day, hour).is_ok());
        for (ttl, reply) in [(Duration::ZERO, Duration::ZERO), (hour / 2, hour)] {
            let error = validate_record_ttl("x.record-ttl", ttl, reply).unwrap_err();
            assert_eq!(error.field_name(), Some("x.record-ttl"));
        }
    }

    #[test]
    fn bucket_names_are_checked_naming_the_field() {
        assert!(validate_bucket("payment.bucket", "jetsaga_payment").is_ok());
        for bad in ["", "a.b", "a b", ".x"] {
            let error = validate_bucket("payment.bucket", bad)
                .unwrap_err()
                .to_string();
            assert!(error.contains("payment.bucket"), "{bad:?}: {error}");
        }
    }
}
