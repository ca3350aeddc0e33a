//! Dead letters: copies of messages nobody could handle, kept for an operator.
//!
//! The copy goes to `saga.dead.<source>` (stream `JETSAGA_DEAD_LETTERS`) with the original
//! headers plus `Jetsaga-Dead-Reason` (one line, at most [`MAX_REASON`] characters) and
//! `Jetsaga-Dead-Subject`, and `Nats-Msg-Id` = `dead:<stream>:<stream sequence>` of the
//! original, so a redelivered poison message, or several instances copying the same one,
//! leave one dead letter. The original is terminated only after the copy's PubAck.

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
    let failed = |e: async_nats::Error| Error {
        subject: subject.clone(),
        source: e,
    };
    js.publish_with_headers(subject.clone(), headers, letter.payload)
        .await
        .map_err(|e| failed(e.into()))?
        .await
        .map_err(|e| failed(e.into()))?;
    Ok(())
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
