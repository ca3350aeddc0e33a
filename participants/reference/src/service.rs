//! What every reference participant does around its logic: KV buckets, the metrics endpoint.

use std::net::SocketAddr;

use async_nats::jetstream::{self, kv};
use axum::Router;
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::Error;

/// The bucket `name`, created (one value per key, `replicas` copies) if it does not exist.
///
/// # Errors
///
/// [`Error::Kv`] if it can be neither opened nor created.
pub async fn bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<kv::Store, Error> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    let created = js
        .create_key_value(kv::Config {
            bucket: name.to_owned(),
            description: "jetsaga reference participant state".to_owned(),
            history: 1,
            num_replicas: replicas.max(1),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Another instance may have created it meanwhile.
        Err(e) => js
            .get_key_value(name)
            .await
            .map_err(|_| Error::Kv(format!("bucket {name}: {e}"))),
    }
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
    nats: &crate::config::Nats,
    registry: prometheus::Registry,
) -> jetsaga_participant::Builder {
    jetsaga_participant::Participant::builder(name)
        .concurrency(consumer.concurrency)
        .max_ack_pending(consumer.max_ack_pending)
        .ack_wait(consumer.ack_wait)
        .max_deliver(consumer.max_deliver)
        .shutdown_grace(consumer.shutdown_grace)
        .stream_replicas(nats.replicas)
        .registry(registry)
}
