//! Copies of messages that could not be decoded, kept for an operator.
//!
//! The copy goes to `saga.dead.<source>` (stream `JETSAGA_DEAD_LETTERS`) with the original
//! headers plus `Jetsaga-Dead-Reason` and `Jetsaga-Dead-Subject`; the original is then
//! terminated (`Term` carries no reason, so the copy does).

use async_nats::jetstream::{self, Message};
use jetsaga_sagas::protocol::header;
use jetsaga_sagas::streams::dead_letter_subject;

use crate::Error;

/// Longest reason kept in the header.
const MAX_REASON: usize = 1024;

/// Publishes a dead-letter copy of `msg` under `saga.dead.<source>` and awaits its ack.
///
/// # Errors
///
/// [`Error::Publish`] if JetStream did not store the copy.
pub async fn publish(
    js: &jetstream::Context,
    source: &str,
    msg: &Message,
    reason: &str,
) -> Result<(), Error> {
    let subject = dead_letter_subject(source);
    let mut headers = msg.headers.clone().unwrap_or_default();
    headers.insert(header::DEAD_REASON, header_safe(reason));
    headers.insert(header::DEAD_SUBJECT, header_safe(msg.subject.as_str()));
    let failed = |e: &dyn std::fmt::Display| Error::Publish {
        subject: subject.clone(),
        reason: e.to_string(),
    };
    js.publish_with_headers(subject.clone(), headers, msg.payload.clone())
        .await
        .map_err(|e| failed(&e))?
        .await
        .map_err(|e| failed(&e))?;
    Ok(())
}

/// Header values may not hold line breaks; long reasons are cut.
fn header_safe(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON)
        .collect();
    if out.len() < text.len() && text.chars().count() > MAX_REASON {
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
    }
}
