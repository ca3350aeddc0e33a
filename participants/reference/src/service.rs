//! What every reference participant does around its logic: the connection, KV buckets, the
//! metrics endpoint.

use std::net::SocketAddr;

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
