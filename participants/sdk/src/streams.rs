//! The JetStream streams a participant needs, created from the shared specs.
//!
//! [`config`] is the one conversion from [`jetsaga_sagas::streams::Spec`] to an async-nats
//! stream configuration; the orchestrator uses it too, so both create identical streams.
//! [`ensure`] creates the streams a participant relies on when they are missing and never
//! touches existing ones: their configuration belongs to the orchestrator's operator.

use async_nats::jetstream::{self, stream};
use jetsaga_sagas::streams::{self as specs, Retention, Spec};

use crate::Error;

/// The streams a participant reads from or writes to.
pub const NEEDED: [&Spec; 4] = [
    &specs::COMMANDS,
    &specs::REPLIES,
    &specs::EVENTS,
    &specs::DEAD_LETTERS,
];

/// The async-nats configuration of `spec`, with `replicas` copies on `storage`.
pub fn config(spec: &Spec, replicas: usize, storage: stream::StorageType) -> stream::Config {
    let retention = match spec.retention {
        Retention::Limits => stream::RetentionPolicy::Limits,
    };
    stream::Config {
        name: spec.name.to_owned(),
        subjects: spec.subjects.iter().map(|s| (*s).to_owned()).collect(),
        retention,
        max_age: spec.max_age,
        max_messages_per_subject: spec.max_msgs_per_subject.unwrap_or(-1),
        allow_direct: spec.allow_direct,
        allow_message_schedules: spec.allow_msg_schedules,
        allow_message_ttl: spec.allow_msg_ttl,
        duplicate_window: spec.duplicate_window,
        num_replicas: replicas.max(1),
        storage,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// Creates each of `specs` that does not exist yet (file storage, `replicas` copies);
/// existing streams are left exactly as they are.
///
/// # Errors
///
/// [`Error::Stream`] if a stream can be neither found nor created.
pub async fn ensure(
    js: &jetstream::Context,
    specs: &[&Spec],
    replicas: usize,
) -> Result<(), Error> {
    for spec in specs {
        let missing = match js.get_stream(spec.name).await {
            Ok(_) => false,
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(err)
                    if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    true
                }
                _ => {
                    return Err(Error::Stream {
                        stream: spec.name,
                        reason: e.to_string(),
                    });
                }
            },
        };
        if !missing {
            continue;
        }
        let created = js
            .create_stream(config(spec, replicas, stream::StorageType::File))
            .await;
        if let Err(create) = created {
            // Another process may have created it between our look-up and our create.
            if js.get_stream(spec.name).await.is_err() {
                return Err(Error::Stream {
                    stream: spec.name,
                    reason: create.to_string(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_map_one_to_one() {
        let replies = config(&specs::REPLIES, 3, stream::StorageType::File);
        assert_eq!(replies.name, "JETSAGA_REPLIES");
        assert_eq!(
            replies.subjects,
            vec![jetsaga_sagas::protocol::subject::REPLIES.to_owned()]
        );
        assert!(replies.allow_direct);
        assert_eq!(replies.num_replicas, 3);
        assert_eq!(replies.max_age, specs::REPLIES.max_age);
        assert_eq!(replies.max_messages_per_subject, -1);
        let timers = config(&specs::TIMERS, 0, stream::StorageType::Memory);
        assert_eq!(timers.num_replicas, 1);
        assert_eq!(timers.max_messages_per_subject, 1);
        assert!(timers.allow_message_schedules && timers.allow_message_ttl);
        assert_eq!(timers.storage, stream::StorageType::Memory);
    }
}
