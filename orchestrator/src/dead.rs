//! Dead letters: poison inputs are terminated and copied, with the reason and
//! their original headers, to the dead-letter stream where operators can list
//! and redrive them. JetStream's max-deliveries advisories for jetsaga's
//! consumers are captured the same way.

use async_nats::jetstream;
use futures::StreamExt;
use jetsaga_runtime::dead_letter;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Copies a message to the dead-letter stream, then terminates it. If the copy
/// cannot be stored the message is nak'd instead, so nothing is lost.
pub(crate) async fn publish_and_term(
    js: &jetstream::Context,
    source: &str,
    message: jetstream::Message,
    reason: &str,
) {
    let kind = dead_letter::settle(js, source, &message, reason).await;
    jetsaga_runtime::consume::settle(&message, kind).await;
}

#[derive(Debug, Deserialize)]
struct MaxDeliveries {
    stream: String,
    consumer: String,
    stream_seq: u64,
    deliveries: u64,
}

/// The advisory subject for consumers that exhausted their deliveries.
pub(crate) const MAX_DELIVERIES_ADVISORY: &str = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>";

/// Copies messages that exhausted their deliveries on a jetsaga consumer
/// (`orchestrator-*`, `participant-*`) to the dead-letter stream. Every instance
/// listens; the copy's message id makes the duplicates collapse.
pub(crate) async fn watch_max_deliveries(
    client: async_nats::Client,
    js: jetstream::Context,
    metrics: Metrics,
    token: CancellationToken,
) {
    let mut advisories = match client.subscribe(MAX_DELIVERIES_ADVISORY).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch max-deliveries advisories");
            return;
        }
    };
    loop {
        let advisory = tokio::select! {
            next = advisories.next() => match next { Some(a) => a, None => break },
            () = token.cancelled() => break,
        };
        let Ok(event) = serde_json::from_slice::<MaxDeliveries>(&advisory.payload) else {
            continue;
        };
        if !(event.consumer.starts_with("orchestrator-")
            || event.consumer.starts_with("participant-"))
        {
            continue;
        }
        let stream = match js.get_stream(&event.stream).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, stream = event.stream, "max deliveries: stream lookup failed");
                continue;
            }
        };
        let message = match stream.get_raw_message(event.stream_seq).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, seq = event.stream_seq, "max deliveries: message gone");
                continue;
            }
        };
        let reason = format!(
            "max deliveries ({}) reached on consumer {}",
            event.deliveries, event.consumer
        );
        let source = format!("maxdeliver.{}", event.consumer);
        let letter = dead_letter::DeadLetter {
            source: &source,
            subject: &message.subject,
            headers: Some(&message.headers),
            payload: message.payload,
            reason: &reason,
            msg_id: dead_letter::msg_id(&event.stream, event.stream_seq),
        };
        match dead_letter::publish(&js, letter).await {
            Ok(()) => {
                metrics
                    .dead_letters
                    .with_label_values(&["max_deliveries"])
                    .inc();
                tracing::warn!(
                    consumer = event.consumer,
                    seq = event.stream_seq,
                    "dead-lettered after max deliveries"
                );
            }
            Err(e) => tracing::error!(error = %e, "could not store a max-deliveries dead letter"),
        }
    }
}
