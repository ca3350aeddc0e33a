//! Dead letters: copies of messages nobody could handle, kept for an operator.
//!
//! The copy goes to `saga.dead.<source>` (stream `JETSAGA_DEAD_LETTERS`) with the original
//! headers plus `Jetsaga-Dead-Reason` (one line, at most [`MAX_REASON`] characters) and
//! `Jetsaga-Dead-Subject`, and `Nats-Msg-Id` = `dead:<stream>:<stream sequence>` of the
//! original, so a redelivered poison message, or several instances copying the same one,
//! leave one dead letter. The original is terminated only after the copy's PubAck. A copy
//! that would not fit in the server's `max_payload` (the original was near it: the added
//! headers push it over) keeps only the first bytes of the body and says so in
//! `Jetsaga-Dead-Truncated` (the original length); such a letter cannot be redriven.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, Message};
use jetsaga_sagas::protocol::header;
use jetsaga_sagas::streams::dead_letter_subject;

/// Longest reason kept in the header.
pub const MAX_REASON: usize = 1024;
/// Redelivery delay of a message whose dead letter could not be stored.
pub const RETRY_DELAY: Duration = Duration::from_secs(1);

/// A dead letter was not stored.
#[derive(Debug, thiserror::Error)]
#[error("publish dead letter to {subject}: {source}")]
pub struct Error {
    /// Where it was published.
    pub subject: String,
    /// What the server or client said.
    #[source]
    pub source: async_nats::Error,
}

/// One dead letter.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    /// Where the message failed (`orchestrator.replies`, `participant.inventory`).
    pub source: &'a str,
    /// The subject it was consumed from.
    pub subject: &'a str,
    /// Its headers.
    pub headers: Option<&'a HeaderMap>,
    /// Its body.
    pub payload: bytes::Bytes,
    /// Why it is dead.
    pub reason: &'a str,
    /// The copy's `Nats-Msg-Id` (see [`msg_id`]).
    pub msg_id: String,
}

/// The `Nats-Msg-Id` of the dead letter of message `seq` of `stream`.
pub fn msg_id(stream: &str, seq: u64) -> String {
    format!("dead:{stream}:{seq}")
}

/// The dead letter of a consumed message.
pub fn of_message<'a>(source: &'a str, message: &'a Message, reason: &'a str) -> DeadLetter<'a> {
    let msg_id = match message.info() {
        Ok(info) => msg_id(info.stream, info.stream_sequence),
        // Not from a stream consumer: nothing to collapse duplicates on.
        Err(_) => format!("dead:{}:{}", message.subject, uuid_like(message)),
    };
    DeadLetter {
        source,
        subject: message.subject.as_str(),
        headers: message.headers.as_ref(),
        payload: message.payload.clone(),
        reason,
        msg_id,
    }
}

fn uuid_like(message: &Message) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    message.payload.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// Publishes `letter` and awaits its PubAck.
///
/// # Errors
///
/// [`Error`] if JetStream did not store it.
pub async fn publish(js: &jetstream::Context, letter: DeadLetter<'_>) -> Result<(), Error> {
    let subject = dead_letter_subject(letter.source);
    let mut headers = letter.headers.cloned().unwrap_or_default();
    headers.insert(header::MSG_ID, letter.msg_id.as_str());
    headers.insert(header::DEAD_REASON, header_safe(letter.reason));
    headers.insert(header::DEAD_SUBJECT, header_safe(letter.subject));
    let mut payload = letter.payload;
    let length = payload.len().to_string();
    // Room for the truncation header itself too.
    let headers_len = wire_len(&headers) + header::DEAD_TRUNCATED.len() + length.len() + 4;
    if let Some(keep) = fit(payload.len(), headers_len, js.client().max_payload()) {
        headers.insert(header::DEAD_TRUNCATED, length.as_str());
        payload.truncate(keep);
    }
    let failed = |e: async_nats::Error| Error {
        subject: subject.clone(),
        source: e,
    };
    js.publish_with_headers(subject.clone(), headers, payload)
        .await
        .map_err(|e| failed(e.into()))?
        .await
        .map_err(|e| failed(e.into()))?;
    Ok(())
}

/// The size of `headers` on the wire (`NATS/1.0`, one `Name: value` line per value, the
/// blank line), which counts towards `max_payload` with the body.
fn wire_len(headers: &HeaderMap) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(|v| name.len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum();
    "NATS/1.0\r\n\r\n".len() + lines
}

/// How much of a `payload_len`-byte body fits beside `headers_len` bytes of headers in
/// `max_payload`; `None` when all of it does.
fn fit(payload_len: usize, headers_len: usize, max_payload: usize) -> Option<usize> {
    (headers_len + payload_len > max_payload).then(|| max_payload.saturating_sub(headers_len))
}

/// Copies `message` to the dead letters and says how to settle it: [`AckKind::Term`] once
/// stored, else a delayed [`AckKind::Nak`] so nothing is lost.
pub async fn settle(
    js: &jetstream::Context,
    source: &str,
    message: &Message,
    reason: &str,
) -> AckKind {
    match publish(js, of_message(source, message, reason)).await {
        Ok(()) => AckKind::Term,
        Err(e) => {
            tracing::error!(error = %e, "could not store a dead letter; the message stays pending");
            AckKind::Nak(Some(RETRY_DELAY))
        }
    }
}

/// Header values may not hold line breaks; long reasons are cut.
pub fn header_safe(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON)
        .collect();
    if text.chars().count() > MAX_REASON {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_copy_too_big_for_max_payload_keeps_what_fits() {
        assert_eq!(super::fit(100, 50, 1000), None);
        assert_eq!(super::fit(950, 50, 1000), None);
        assert_eq!(super::fit(951, 50, 1000), Some(950));
        assert_eq!(super::fit(1 << 20, 300, 1 << 20), Some((1 << 20) - 300));
        assert_eq!(super::fit(10, 2000, 1000), Some(0));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Key", "value");
        headers.append("Key", "second");
        headers.insert("Other", "x");
        // NATS/1.0\r\n + Key: value\r\n + Key: second\r\n + Other: x\r\n + \r\n
        assert_eq!(super::wire_len(&headers), 10 + 12 + 13 + 10 + 2);
    }

    #[test]
    fn reasons_fit_in_a_header() {
        assert_eq!(super::header_safe("bad\r\njson"), "bad  json");
        let long = "x".repeat(5000);
        assert_eq!(
            super::header_safe(&long).chars().count(),
            super::MAX_REASON + 1
        );
        assert_eq!(
            super::msg_id("JETSAGA_REPLIES", 7),
            "dead:JETSAGA_REPLIES:7"
        );
    }
}
