//! Dead letters: poison inputs are terminated and copied, with the reason and
//! their original headers, to the dead-letter stream where operators can list
//! and redrive them. JetStream's max-deliveries advisories for jetsaga's
//! consumers are captured the same way.

use async_nats::jetstream;
use async_nats::jetstream::stream::DirectGetErrorKind;
use futures::StreamExt;
use jetsaga_runtime::dead_letter;
use jetsaga_sagas::protocol::header;
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

/// Copies messages that exhausted their deliveries on any consumer of a
/// jetsaga stream (the orchestrator's, the participants', the notification's,
/// whatever their names) to the dead-letter stream. The advisories are read
/// from the durable `orchestrator-advisories` consumer on their own stream, so those
/// emitted while no orchestrator ran are copied when one starts. Every
/// instance shares the consumer; the copy's message id makes repeats collapse.
pub(crate) async fn watch_max_deliveries(
    advisories: jetstream::consumer::PullConsumer,
    js: jetstream::Context,
    metrics: Metrics,
    token: CancellationToken,
) {
    while !token.is_cancelled() {
        let mut messages = match advisories.messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read max-deliveries advisories; trying again");
                tokio::select! {
                    () = tokio::time::sleep(jetsaga_runtime::consume::RESUBSCRIBE_DELAY) => continue,
                    () = token.cancelled() => return,
                }
            }
        };
        loop {
            let advisory = tokio::select! {
                next = messages.next() => match next {
                    Some(Ok(a)) => a,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "advisory pull hiccup");
                        continue;
                    }
                    None => break,
                },
                () = token.cancelled() => return,
            };
            let kind = copy_max_delivered(&js, &metrics, &advisory.payload).await;
            jetsaga_runtime::consume::settle(&advisory, kind).await;
        }
    }
}

/// Copies the message one advisory names; the advisory is done with (`Ack`)
/// unless the copy could not be stored.
async fn copy_max_delivered(
    js: &jetstream::Context,
    metrics: &Metrics,
    payload: &[u8],
) -> jetstream::AckKind {
    let done = jetstream::AckKind::Ack;
    let Ok(event) = serde_json::from_slice::<MaxDeliveries>(payload) else {
        tracing::warn!("max deliveries: an advisory that cannot be read; skipped");
        return done;
    };
    let ours = jetsaga_sagas::streams::ALL.iter().any(|spec| {
        spec.name == event.stream && spec.name != jetsaga_sagas::streams::ADVISORIES.name
    });
    if !ours {
        return done;
    }
    let stream = match js.get_stream(&event.stream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, stream = event.stream, "max deliveries: stream lookup failed");
            return jetstream::AckKind::Nak(Some(std::time::Duration::from_secs(5)));
        }
    };
    let message = match stream.get_raw_message(event.stream_seq).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, seq = event.stream_seq, "max deliveries: message gone");
            return done;
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
    match dead_letter::publish(js, letter).await {
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
            done
        }
        Err(e) => {
            tracing::error!(error = %e, "could not store a max-deliveries dead letter");
            jetstream::AckKind::Nak(Some(std::time::Duration::from_secs(5)))
        }
    }
}

/// One stored dead letter, as operators see it.
#[derive(Debug, Clone)]
pub struct Letter {
    /// Its sequence in the dead-letter stream: its id.
    pub id: u64,
    /// Where it failed (`orchestrator.replies`, `participant.inventory`).
    pub source: String,
    /// The subject it was consumed from, where a redrive sends it.
    pub subject: Option<String>,
    /// Why it is dead.
    pub reason: Option<String>,
    /// Every header, the dead-letter ones included.
    pub headers: Vec<(String, String)>,
    /// Its body.
    pub payload: bytes::Bytes,
    /// When it was dead-lettered.
    pub at: chrono::DateTime<chrono::Utc>,
}

/// Why a dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No dead letter has this id.
    #[error("dead letter {0} not found")]
    NotFound(u64),
    /// The source filter is not a subject suffix.
    #[error("invalid source \"{0}\": dot-separated words without spaces or wildcards")]
    InvalidSource(String),
    /// The letter does not say where it came from, or nothing stores that subject.
    #[error("dead letter {id} cannot be redriven: {why}")]
    NotRedrivable {
        /// The letter.
        id: u64,
        /// Why.
        why: String,
    },
    /// The stream could not be read or changed.
    #[error("dead-letter stream: {0}")]
    Stream(String),
}

/// The headers only the dead letter has; a redrive drops them.
const DEAD_ONLY: [&str; 3] = [header::DEAD_REASON, header::DEAD_SUBJECT, header::MSG_ID];

fn letter(message: jetstream::message::StreamMessage) -> Letter {
    let prefix = jetsaga_sagas::streams::dead_letter_subject("");
    let first = |name: &str| message.headers.get(name).map(ToString::to_string);
    let mut headers: Vec<(String, String)> = message
        .headers
        .iter()
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |v| (name.to_string(), v.to_string()))
        })
        .collect();
    headers.sort();
    let nanos = message.time.unix_timestamp_nanos();
    let at = chrono::DateTime::from_timestamp_nanos(i64::try_from(nanos).unwrap_or(i64::MAX));
    Letter {
        id: message.sequence,
        source: message
            .subject
            .strip_prefix(&prefix)
            .unwrap_or(&message.subject)
            .to_owned(),
        subject: first(header::DEAD_SUBJECT),
        reason: first(header::DEAD_REASON),
        headers,
        payload: message.payload,
        at,
    }
}

async fn stream(js: &jetstream::Context) -> Result<jetstream::stream::Stream, Error> {
    js.get_stream(jetsaga_sagas::streams::DEAD_LETTERS.name)
        .await
        .map_err(|e| Error::Stream(e.to_string()))
}

/// Up to `limit` dead letters with an id of at least `from`, oldest first, from
/// `source` (exactly: `participant.inventory`) or from all.
pub(crate) async fn list(
    js: &jetstream::Context,
    source: Option<&str>,
    from: u64,
    limit: usize,
) -> Result<Vec<Letter>, Error> {
    let filter = match source {
        Some(s) => {
            let valid = !s.is_empty()
                && s.split('.').all(|t| {
                    !t.is_empty()
                        && t.bytes()
                            .all(|b| b.is_ascii_graphic() && !matches!(b, b'*' | b'>'))
                });
            if !valid {
                return Err(Error::InvalidSource(s.to_owned()));
            }
            jetsaga_sagas::streams::dead_letter_subject(s)
        }
        None => jetsaga_sagas::streams::dead_letter_subject(">"),
    };
    let stream = stream(js).await?;
    let mut out = Vec::new();
    let mut next = from.max(1);
    while out.len() < limit {
        let message = match stream
            .direct_get_next_for_subject(filter.as_str(), Some(next))
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
            Err(e) => return Err(Error::Stream(e.to_string())),
        };
        next = message.sequence + 1;
        out.push(letter(message));
    }
    Ok(out)
}

async fn get(stream: &jetstream::stream::Stream, id: u64) -> Result<Letter, Error> {
    match stream.direct_get(id).await {
        Ok(m) => Ok(letter(m)),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Err(Error::NotFound(id)),
        Err(e) => Err(Error::Stream(e.to_string())),
    }
}

/// Publishes dead letter `id` again to the subject it was consumed from, with its
/// original headers (less the dead-letter ones); returns that subject. The copy's
/// `Nats-Msg-Id` is `redrive:<id>`, so a repeated redrive within the target
/// stream's duplicate window is stored once. The letter stays until deleted.
pub(crate) async fn redrive(js: &jetstream::Context, id: u64) -> Result<String, Error> {
    let stream = stream(js).await?;
    let message = match stream.direct_get(id).await {
        Ok(m) => m,
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Err(Error::NotFound(id)),
        Err(e) => return Err(Error::Stream(e.to_string())),
    };
    let Some(subject) = message
        .headers
        .get(header::DEAD_SUBJECT)
        .map(ToString::to_string)
    else {
        return Err(Error::NotRedrivable {
            id,
            why: format!("it has no {} header", header::DEAD_SUBJECT),
        });
    };
    let mut headers = async_nats::HeaderMap::new();
    for (name, values) in message.headers.iter() {
        let name = name.to_string();
        if DEAD_ONLY.iter().any(|d| d.eq_ignore_ascii_case(&name)) {
            continue;
        }
        for value in values {
            headers.append(name.as_str(), value.as_str());
        }
    }
    if let Some(length) = message.headers.get(header::DEAD_TRUNCATED) {
        return Err(Error::NotRedrivable {
            id,
            why: format!("only the first bytes of its {length}-byte body were kept"),
        });
    }
    headers.insert(header::MSG_ID, format!("redrive:{id}").as_str());
    let not_redrivable = |why: String| Error::NotRedrivable { id, why };
    js.publish_with_headers(subject.clone(), headers, message.payload)
        .await
        .map_err(|e| not_redrivable(e.to_string()))?
        .await
        .map_err(|e| not_redrivable(format!("{subject}: {e}")))?;
    tracing::info!(id, subject, "dead letter redriven");
    Ok(subject)
}

/// Removes dead letter `id`.
pub(crate) async fn delete(js: &jetstream::Context, id: u64) -> Result<(), Error> {
    let stream = stream(js).await?;
    get(&stream, id).await?;
    match stream.delete_message(id).await {
        Ok(_) => Ok(()),
        // Deleted by someone else between the two calls.
        Err(e) if e.to_string().contains("no message found") => Err(Error::NotFound(id)),
        Err(e) => Err(Error::Stream(e.to_string())),
    }
}
