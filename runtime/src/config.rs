//! Configuration loading, the same for every binary: the type's defaults, then an optional TOML
//! file, then `JETSAGA_<SECTION>__<KEY>` environment variables, then [`Validate::validate`].
//!
//! The loader is [`figment`]; this module adds the environment naming (`KEY` is the kebab-case
//! key in upper snake case: `JETSAGA_ENGINE__MAX_IN_FLIGHT` sets `engine.max-in-flight`; values
//! are read as TOML values, else as strings) and errors that name the field and where its value
//! came from. One rule everywhere: a section or key the binary does not know is refused by name,
//! in the file and in the environment alike (configs use `#[serde(deny_unknown_fields)]`).
//!
//! ```no_run
//! use jetsaga_runtime::config::{self, Validate};
//!
//! #[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
//! #[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
//! struct Config {
//!     nats: jetsaga_runtime::nats::Nats,
//! }
//!
//! impl Validate for Config {
//!     fn validate(&self) -> Result<(), config::Error> {
//!         self.nats.validate()
//!     }
//! }
//!
//! let config: Config = config::load(None, std::env::vars())?;
//! # Ok::<(), config::Error>(())
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::DeserializeOwned;

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "JETSAGA_";
/// The environment variable naming a config file.
pub const CONFIG_ENV: &str = "JETSAGA_CONFIG";

/// Where a field's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// The TOML file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("the default"),
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Env(name) => write!(f, "environment variable {name}"),
        }
    }
}

/// What kind of problem a configuration has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file could not be read.
    Read,
    /// The file is not TOML.
    Syntax,
    /// A section or key the binary does not have.
    Unknown,
    /// A value of the wrong type or out of range.
    Invalid,
}

/// A configuration that is not usable; the message names the field (or file).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config file {path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A section or key the binary does not know.
    #[error("config field `{field}` (from {origin}): unknown {what}")]
    Unknown {
        /// Dotted path, e.g. `engine.colour`.
        field: String,
        /// `section` or `key`.
        what: &'static str,
        /// Where it was set.
        origin: Origin,
    },
    /// A field has the wrong type or is out of range.
    #[error("config field `{field}` (from {origin}): {message}")]
    Field {
        /// Dotted path, e.g. `faults.latency`.
        field: String,
        /// What is wrong.
        message: String,
        /// Where the value came from.
        origin: Origin,
    },
}

impl Error {
    /// A field error, for `validate()` implementations; the loader fills in the origin.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        Self::Field {
            field: field.to_owned(),
            message: message.into(),
            origin: Origin::Default,
        }
    }

    /// What kind of problem this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Read { .. } => ErrorKind::Read,
            Self::Syntax { .. } => ErrorKind::Syntax,
            Self::Unknown { .. } => ErrorKind::Unknown,
            Self::Field { .. } => ErrorKind::Invalid,
        }
    }

    /// The dotted name of the field at fault, if a field is.
    pub fn field_name(&self) -> Option<&str> {
        match self {
            Self::Unknown { field, .. } | Self::Field { field, .. } => Some(field),
            Self::Read { .. } | Self::Syntax { .. } => None,
        }
    }

    /// Where the faulty value came from, if a field is at fault.
    pub fn origin(&self) -> Option<&Origin> {
        match self {
            Self::Unknown { origin, .. } | Self::Field { origin, .. } => Some(origin),
            Self::Read { .. } | Self::Syntax { .. } => None,
        }
    }
}

/// A configuration's checks beyond what serde can express.
pub trait Validate {
    /// Checks ranges and combinations.
    ///
    /// # Errors
    ///
    /// [`Error::field`] naming the first invalid field.
    fn validate(&self) -> Result<(), Error>;
}

/// Loads `T`: its defaults (`#[serde(default)]`), then `file`, then the `JETSAGA_*` variables
/// among `env`, then [`Validate::validate`].
///
/// # Errors
///
/// Any [`Error`], naming the field and where its value came from.
pub fn load<T: DeserializeOwned + Validate>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, Error> {
    let mut figment = Figment::new();
    if let Some(path) = file {
        // figment treats a missing file as empty; a file named on purpose must exist.
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        if let Err(e) = text.parse::<toml::Table>() {
            return Err(Error::Syntax {
                path: path.to_owned(),
                message: e.message().to_owned(),
            });
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    let figment = figment.merge(EnvVars::new(env));
    let config: T = figment.extract().map_err(|e| from_figment(&figment, e))?;
    config.validate().map_err(|e| match e {
        Error::Field { field, message, .. } => Error::Field {
            origin: origin_of(&figment, &field),
            field,
            message,
        },
        other => other,
    })?;
    Ok(config)
}

/// The file named by [`CONFIG_ENV`] in `env`, if set and not empty.
pub fn file_from_env(env: impl IntoIterator<Item = (String, String)>) -> Option<PathBuf> {
    env.into_iter()
        .find(|(name, value)| name == CONFIG_ENV && !value.is_empty())
        .map(|(_, value)| PathBuf::from(value))
}

fn origin_of(figment: &Figment, field: &str) -> Origin {
    let path: Vec<&str> = field.split('.').collect();
    figment
        .find_metadata(field)
        .map_or(Origin::Default, |md| origin_from(md, &path))
}

fn origin_from(metadata: &Metadata, path: &[&str]) -> Origin {
    if let Some(file) = metadata.source.as_ref().and_then(|s| s.file_path()) {
        return Origin::File(file.to_owned());
    }
    if metadata.name == EnvVars::NAME {
        return Origin::Env(metadata.interpolate(&Profile::Default, path));
    }
    Origin::Default
}

fn from_figment(figment: &Figment, error: figment::Error) -> Error {
    use figment::error::Kind;
    let mut path = error.path.clone();
    let origin_path = |path: &[String]| -> Origin {
        let keys: Vec<&str> = path.iter().map(String::as_str).collect();
        match &error.metadata {
            Some(md) => origin_from(md, &keys),
            None => origin_of(figment, &keys.join(".")),
        }
    };
    match &error.kind {
        Kind::UnknownField(name, _) => {
            // figment's path may or may not already end with the unknown name.
            if path.last() != Some(name) {
                path.push(name.clone());
            }
            let what = if path.len() == 1 { "section" } else { "key" };
            Error::Unknown {
                origin: origin_path(&path),
                field: path.join("."),
                what,
            }
        }
        kind => Error::Field {
            origin: origin_path(&path),
            field: path.join("."),
            message: kind.to_string(),
        },
    }
}

/// The `JETSAGA_<SECTION>__<KEY>` variables as a figment provider.
struct EnvVars {
    dict: Dict,
}

impl EnvVars {
    const NAME: &'static str = "environment variable";

    fn new(env: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut dict = Dict::new();
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            let section = section.to_ascii_lowercase().replace('_', "-");
            let key = key.to_ascii_lowercase().replace('_', "-");
            let entry = dict
                .entry(section)
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, table) = entry {
                table.insert(key, env_value(&raw));
            }
        }
        Self { dict }
    }
}

/// An environment value as TOML (`0.5`, `true`, `["a"]`, `{ sku-1 = 5 }`) or else a string.
fn env_value(raw: &str) -> Value {
    let parsed = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut table| table.remove("v"))
        .and_then(|v| Value::serialize(v).ok());
    parsed.unwrap_or_else(|| Value::from(raw.to_owned()))
}

impl Provider for EnvVars {
    fn metadata(&self) -> Metadata {
        Metadata::named(Self::NAME).interpolater(|_profile, keys| {
            let keys: Vec<String> = keys
                .iter()
                .map(|k| k.to_ascii_uppercase().replace('-', "_"))
                .collect();
            match keys.as_slice() {
                // A whole section: whichever of its variables were set.
                [section] => format!("{ENV_PREFIX}{section}__*"),
                _ => format!("{ENV_PREFIX}{}", keys.join("__")),
            }
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// `Duration`s as text through `humantime`: `250ms`, `90s`, `5m`, `1h30m`, `7d`.
///
/// Use as `#[serde(with = "jetsaga_runtime::config::duration")]`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `d` as text (`1h 30m`).
    ///
    /// # Errors
    ///
    /// Those of the serializer.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(d, s)
    }

    /// Reads a duration from text.
    ///
    /// # Errors
    ///
    /// When the text is not a duration; the message quotes it.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration \"{text}\": {e}")))
    }
}
