//! Reading and writing records: direct or leader reads, compare-and-set writes, and the cache
//! of reservations this process just wrote.

use std::collections::{HashMap, VecDeque};

use async_nats::jetstream::kv;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::Bytes;

use super::records::{Reservation, encode, reservation_key};
use super::{Inventory, Step, transient};
use jetsaga_participant::Handled;

/// Where a read is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Read {
    /// Any replica (direct get when the bucket allows it): may miss the latest writes, which
    /// is fine for a decision that then writes under compare-and-set.
    Any,
    /// The stream leader (`STREAM.MSG.GET`): for decisions that write nothing, which no
    /// compare-and-set would catch if the read were stale.
    Leader,
}

/// The value and revision of `key`, or `None` if it is absent or deleted.
pub(super) async fn entry(
    store: &kv::Store,
    key: &str,
    read: Read,
) -> Result<Option<(Bytes, u64)>, String> {
    match read {
        Read::Any => match store.entry(key).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                Ok(Some((entry.value, entry.revision)))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(e.to_string()),
        },
        Read::Leader => {
            // What `Store::entry` does when the bucket has no direct get.
            let subject = format!("{}{key}", store.prefix);
            match store.stream.get_last_raw_message_by_subject(&subject).await {
                Ok(message) => {
                    let deleted = message
                        .headers
                        .get("KV-Operation")
                        .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
                    Ok((!deleted).then_some((message.payload, message.sequence)))
                }
                Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

/// A bounded map of recently written reservations (oldest evicted first).
#[derive(Debug, Default)]
pub(super) struct Recent {
    entries: HashMap<String, (Reservation, u64)>,
    order: VecDeque<String>,
}

impl Recent {
    const CAPACITY: usize = 65_536;

    pub(super) fn insert(&mut self, saga_id: &str, record: Reservation, revision: u64) {
        if self
            .entries
            .insert(saga_id.to_owned(), (record, revision))
            .is_none()
        {
            self.order.push_back(saga_id.to_owned());
        }
        while self.order.len() > Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
    }

    pub(super) fn take(&mut self, saga_id: &str) -> Option<(Reservation, u64)> {
        // The key stays in `order` until it ages out; removing it there would be O(n).
        self.entries.remove(saga_id)
    }
}

impl Inventory {
    /// The saga's reservation and its revision.
    pub(super) async fn read(&self, saga_id: &str, read: Read) -> Step<Option<(Reservation, u64)>> {
        let Some((value, revision)) = entry(&self.store, &reservation_key(saga_id), read)
            .await
            .map_err(|e| transient("reading the reservation", e))?
        else {
            return Ok(None);
        };
        let reservation = serde_json::from_slice(&value)
            .map_err(|e| Handled::failed("corrupt_state", format!("reservation record: {e}")))?;
        Ok(Some((reservation, revision)))
    }

    /// Writes `reservation` if the record is still at `revision` (`None`: absent) and returns
    /// the new revision; `None` on a conflict (re-read and decide again).
    pub(super) async fn write(
        &self,
        saga_id: &str,
        reservation: &Reservation,
        revision: Option<u64>,
    ) -> Step<Option<u64>> {
        let key = reservation_key(saga_id);
        let written = match revision {
            None => match self.store.create(&key, encode(reservation)).await {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(e.to_string()),
            },
            Some(revision) => match self.store.update(&key, encode(reservation), revision).await {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(e.to_string()),
            },
        };
        written.map_err(|e| transient("writing the reservation", e))
    }
}
