//! Faults injected into a running JetStream server's streams.

use async_nats::jetstream;

/// What a moved-aside stream's subjects are prefixed with.
pub const MOVED: &str = "moved.";

/// Points stream `name` at `moved.<subject>` for each of its subjects (`aside`), or back at
/// its own subjects. While moved, publishes to its real subjects find no stream (as when it is
/// unavailable) while reads by sequence still work. Moving twice the same way changes nothing.
///
/// # Errors
///
/// When the stream cannot be read or updated.
pub async fn move_subjects(
    js: &jetstream::Context,
    name: &str,
    aside: bool,
) -> Result<(), async_nats::Error> {
    let mut stream = js.get_stream(name).await?;
    let mut config = stream.info().await?.config.clone();
    config.subjects = config
        .subjects
        .iter()
        .map(|s| {
            let own = s.strip_prefix(MOVED).unwrap_or(s);
            if aside {
                format!("{MOVED}{own}")
            } else {
                own.to_owned()
            }
        })
        .collect();
    js.update_stream(config).await?;
    Ok(())
}
