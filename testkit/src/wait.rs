//! Waiting on conditions, never on bare sleeps.

use std::future::Future;
use std::time::Duration;

/// How often [`wait_until`] evaluates its predicate.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls the async predicate `f` about every 20 ms until it returns `true`.
///
/// # Panics
///
/// Panics, naming `what`, if `f` has not returned `true` within `timeout` (a predicate that hangs
/// counts against the timeout too).
///
/// ```no_run
/// # async fn demo(js: async_nats::jetstream::Context) {
/// use std::time::Duration;
/// jetsaga_testkit::wait_until("stream ORDERS exists", Duration::from_secs(10), || async {
///     js.get_stream("ORDERS").await.is_ok()
/// })
/// .await;
/// # }
/// ```
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let polled = tokio::time::timeout(timeout, async {
        loop {
            if f().await {
                return;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    })
    .await;
    if polled.is_err() {
        panic!("timed out after {timeout:?} waiting until {what}");
    }
}
