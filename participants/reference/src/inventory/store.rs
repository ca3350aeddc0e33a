//! Reading and writing records: direct or leader reads, compare-and-set writes, and the cache
//! of reservations this process just wrote.

use std::collections::{HashMap, VecDeque};

use async_nats::jetstream::kv;
use bytes::Bytes;

use super::records::{Reservation, Status, encode, reservation_key};
use super::{Inventory, Step, transient};
use jetsaga_participant::Handled;

pub(super) use jetsaga_runtime::kv::Read;

/// The value and revision of `key`, or `None` if it is absent or deleted.
pub(super) async fn entry(
    store: &kv::Store,
    key: &str,
    read: Read,
) -> Result<Option<(Bytes, u64)>, jetsaga_runtime::kv::Error> {
    jetsaga_runtime::kv::entry(store, key, read).await
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
    /// the new revision; `None` on a conflict (re-read and decide again). A final reservation
    /// is written with the record TTL, so its key goes; a `reserved` one stays.
    pub(super) async fn write(
        &self,
        saga_id: &str,
        reservation: &Reservation,
        revision: Option<u64>,
    ) -> Step<Option<u64>> {
        let key = reservation_key(saga_id);
        let value = encode(reservation).map_err(|e| transient("encoding the reservation", e))?;
        let written = match reservation.status {
            Status::Committed | Status::Rejected | Status::Released => {
                jetsaga_runtime::kv::write_with_ttl(
                    &self.js,
                    &self.store,
                    &key,
                    value,
                    revision,
                    self.settings.record_ttl,
                )
                .await
            }
            Status::Pending | Status::Reserved => {
                jetsaga_runtime::kv::write(&self.store, &key, value, revision).await
            }
        };
        written.map_err(|e| transient("writing the reservation", e))
    }
}
