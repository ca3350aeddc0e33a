//! Dead letters: poison inputs are terminated and copied, with the reason and
//! their original headers, to the dead-letter stream where operators can list
//! and redrive them. JetStream's max-deliveries advisories for jetsaga's
//! consumers are captured the same way.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use jetsaga_sagas::protocol::header;
use jetsaga_sagas::streams;
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
    let msg_id = match message.info() {
        Ok(info) => format!("dead:{}:{}", info.stream, info.stream_sequence),
        Err(_) => format!("dead:{}:{}", message.subject, uuid::Uuid::new_v4()),
    };
    let stored = publish(
        js,
        source,
        &message.subject,
        message.headers.as_ref(),
        message.payload.clone(),
        reason,
        &msg_id,
    )
    .await;
    let kind = match stored {
        Ok(()) => AckKind::Term,
        Err(e) => {
            tracing::error!(error = %e, "could not store a dead letter; the message stays pending");
            AckKind::Nak(Some(std::time::Duration::from_secs(5)))
        }
    };
    if let Err(e) = message.ack_with(kind).await {
        tracing::warn!(error = %e, "could not terminate a dead-lettered message");
    }
}

/// Stores one dead letter.
pub(crate) async fn publish(
    js: &jetstream::Context,
    source: &str,
    subject: &str,
    original: Option<&HeaderMap>,
    payload: bytes::Bytes,
    reason: &str,
    msg_id: &str,
) -> Result<(), String> {
    let mut headers = original.cloned().unwrap_or_default();
    // The original message's own dedup id must not make the copy look like a duplicate.
    headers.insert(header::MSG_ID, msg_id);
    headers.insert(header::DEAD_REASON, one_line(reason).as_str());
    headers.insert(header::DEAD_SUBJECT, subject);
    js.publish_with_headers(streams::dead_letter_subject(source), headers, payload)
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
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
        let msg_id = format!("dead:{}:{}", event.stream, event.stream_seq);
        match publish(
            &js,
            &source,
            &message.subject,
            Some(&message.headers),
            message.payload,
            &reason,
            &msg_id,
        )
        .await
        {
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
