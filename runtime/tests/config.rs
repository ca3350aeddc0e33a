//! Configuration loading: precedence, errors naming the field and its origin, the unknown-key
//! rule, durations.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::time::Duration;

use jetsaga_runtime::config::{self, ErrorKind, Origin, Validate};
use jetsaga_runtime::nats::Nats;
use jetsaga_runtime::streams::{Storage, Streams};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
struct Engine {
    max_in_flight: usize,
    #[serde(with = "config::duration")]
    ack_wait: Duration,
    #[serde(with = "config::duration")]
    grace: Duration,
}

impl Default for Engine {
    fn default() -> Self {
        Self {
            max_in_flight: 16,
            ack_wait: Duration::from_secs(30),
            grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
struct Config {
    nats: Nats,
    streams: Streams,
    engine: Engine,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), config::Error> {
        self.nats.validate()?;
        self.streams.validate()?;
        if self.engine.max_in_flight == 0 {
            return Err(config::Error::field(
                "engine.max-in-flight",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

fn env(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

#[test]
fn defaults_then_file_then_environment() {
    let config: Config = config::load(None, env(&[])).unwrap();
    assert_eq!(config.engine.max_in_flight, 16);
    assert_eq!(config.nats.url, "nats://127.0.0.1:4222");
    assert_eq!(config.streams.storage, Storage::File);

    let toml = file(
        "[engine]\nmax-in-flight = 32\nack-wait = \"90s\"\n\
         [streams]\nstorage = \"memory\"\nretention = \"7d\"\n\
         finished-retention = \"6h\"\nmax-bytes = \"512 MiB\"\n\
         [nats]\nurl = [\"nats://a:4222\", \"nats://b:4222\"]\n",
    );
    let config: Config = config::load(Some(toml.path()), env(&[])).unwrap();
    assert_eq!(
        config.engine.max_in_flight, 32,
        "the file beats the default"
    );
    assert_eq!(config.engine.ack_wait, Duration::from_secs(90));
    assert_eq!(
        config.engine.grace,
        Duration::from_secs(10),
        "untouched default"
    );
    assert_eq!(config.streams.storage, Storage::Memory);
    assert_eq!(config.streams.retention, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(
        config.streams.finished_retention,
        Duration::from_secs(6 * 3600)
    );
    assert_eq!(config.streams.max_bytes, bytesize::ByteSize::mib(512));
    assert_eq!(
        config.nats.url, "nats://a:4222,nats://b:4222",
        "a list of URLs"
    );
    assert_eq!(config.nats.addresses().unwrap().len(), 2);

    let config: Config = config::load(
        Some(toml.path()),
        env(&[
            ("JETSAGA_ENGINE__MAX_IN_FLIGHT", "64"),
            ("JETSAGA_ENGINE__GRACE", "250ms"),
            ("JETSAGA_CONFIG", "not a section"),
            ("OTHER", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(
        config.engine.max_in_flight, 64,
        "the environment beats the file"
    );
    assert_eq!(config.engine.grace, Duration::from_millis(250));
    assert_eq!(
        config.engine.ack_wait,
        Duration::from_secs(90),
        "still the file's"
    );
}

#[test]
fn retention_below_the_duplicate_window_and_tiny_byte_bounds_are_refused() {
    for (var, value, field) in [
        ("JETSAGA_STREAMS__RETENTION", "90s", "streams.retention"),
        ("JETSAGA_STREAMS__RETENTION", "1m", "streams.retention"),
        (
            "JETSAGA_STREAMS__FINISHED_RETENTION",
            "0s",
            "streams.finished-retention",
        ),
        ("JETSAGA_STREAMS__MAX_BYTES", "1000", "streams.max-bytes"),
        ("JETSAGA_STREAMS__COMMAND_TTL", "90s", "streams.command-ttl"),
    ] {
        let err = config::load::<Config>(None, env(&[(var, value)])).unwrap_err();
        assert_eq!(err.field_name(), Some(field), "{var}={value}: {err}");
    }
    let err =
        config::load::<Config>(None, env(&[("JETSAGA_STREAMS__RETENTION", "90s")])).unwrap_err();
    assert!(err.to_string().contains("duplicate window"), "{err}");
    let err =
        config::load::<Config>(None, env(&[("JETSAGA_STREAMS__MAX_BYTES", "lots")])).unwrap_err();
    assert!(err.to_string().contains("max-bytes"), "{err}");
}

#[test]
fn errors_name_the_field_and_where_its_value_came_from() {
    let toml = file("[engine]\nmax-in-flight = 0\n");
    let err = config::load::<Config>(Some(toml.path()), env(&[])).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert_eq!(err.field_name(), Some("engine.max-in-flight"));
    assert_eq!(err.origin(), Some(&Origin::File(toml.path().to_owned())));
    assert!(err.to_string().contains("engine.max-in-flight"), "{err}");

    let err = config::load::<Config>(
        Some(toml.path()),
        env(&[("JETSAGA_STREAMS__REPLICAS", "9")]),
    )
    .unwrap_err();
    assert_eq!(err.field_name(), Some("streams.replicas"));
    assert_eq!(
        err.origin(),
        Some(&Origin::Env("JETSAGA_STREAMS__REPLICAS".to_owned()))
    );
    assert!(
        err.to_string()
            .contains("environment variable JETSAGA_STREAMS__REPLICAS"),
        "{err}"
    );

    let err = config::load::<Config>(None, env(&[("JETSAGA_ENGINE__MAX_IN_FLIGHT", "lots")]))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert_eq!(err.field_name(), Some("engine.max-in-flight"));
    assert_eq!(
        err.origin(),
        Some(&Origin::Env("JETSAGA_ENGINE__MAX_IN_FLIGHT".to_owned()))
    );

    let err =
        config::load::<Config>(None, env(&[("JETSAGA_ENGINE__ACK_WAIT", "soon")])).unwrap_err();
    assert_eq!(err.field_name(), Some("engine.ack-wait"));
    assert!(
        err.to_string().contains("invalid duration \"soon\""),
        "{err}"
    );

    let err = config::load::<Config>(None, env(&[("JETSAGA_NATS__USER", "ana")])).unwrap_err();
    assert_eq!(err.field_name(), Some("nats.user"));

    let broken = file("[engine\n");
    let err = config::load::<Config>(Some(broken.path()), env(&[])).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Syntax);
    let err = config::load::<Config>(Some(std::path::Path::new("/nonexistent/x.toml")), env(&[]))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Read);
    assert!(err.to_string().contains("cannot read config file"), "{err}");
}

#[test]
fn unknown_sections_and_keys_are_refused_by_name() {
    let toml = file("[engine]\ncolour = \"red\"\n");
    let err = config::load::<Config>(Some(toml.path()), env(&[])).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unknown);
    assert_eq!(err.field_name(), Some("engine.colour"));
    assert_eq!(err.origin(), Some(&Origin::File(toml.path().to_owned())));
    assert!(err.to_string().contains("unknown key"), "{err}");

    let err =
        config::load::<Config>(None, env(&[("JETSAGA_HTTP__LISTEN", "127.0.0.1:1")])).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unknown);
    assert_eq!(err.field_name(), Some("http"));
    assert_eq!(
        err.origin(),
        Some(&Origin::Env("JETSAGA_HTTP__*".to_owned()))
    );
    assert!(err.to_string().contains("unknown section"), "{err}");

    let err =
        config::load::<Config>(None, env(&[("JETSAGA_NATS__CREDS_FILE", "x.creds")])).unwrap_err();
    assert_eq!(err.field_name(), Some("nats.creds-file"));
    assert_eq!(
        err.origin(),
        Some(&Origin::Env("JETSAGA_NATS__CREDS_FILE".to_owned()))
    );
}
