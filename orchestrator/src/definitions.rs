//! The definitions the orchestrator knows, by name and version.
//!
//! order-creation ships built in; a definitions directory adds more, or newer
//! versions. A running saga keeps running the version it started with.
//!
//! A definition may name JSON Schema files (`input-schema = "x.schema.json"`, a
//! step's `result-schema`); they are read from the definition file's directory.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use jetsaga_sagas::Definition;
use jetsaga_sagas::definition::Error;

/// The built-in order-creation definition, as shipped in `sagas/definitions/`.
pub const ORDER_CREATION: &str = include_str!("../../sagas/definitions/order-creation.toml");

/// The file name [`ORDER_CREATION`] gives its input schema.
pub const ORDER_CREATION_INPUT_SCHEMA_FILE: &str = "order-creation.input.schema.json";

/// The JSON Schema of order-creation's input, as shipped beside the definition.
pub const ORDER_CREATION_INPUT_SCHEMA: &str =
    include_str!("../../sagas/definitions/order-creation.input.schema.json");

/// Parses the built-in order-creation definition.
pub fn order_creation() -> Result<Definition, Vec<Error>> {
    Definition::parse_with("order-creation.toml", ORDER_CREATION, |name| {
        if name == ORDER_CREATION_INPUT_SCHEMA_FILE {
            Ok(ORDER_CREATION_INPUT_SCHEMA.to_owned())
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not a built-in schema file",
            ))
        }
    })
}

/// Definitions by name and version.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    by_name: BTreeMap<String, BTreeMap<u32, Arc<Definition>>>,
}

impl Registry {
    /// The built-in definitions.
    pub fn builtin() -> Self {
        let mut registry = Self::default();
        // A broken built-in file would be a build defect: it is left out here (a start
        // of its type then reports an unknown type), and this module's tests fail on it.
        if let Ok(def) = order_creation() {
            registry.insert(def);
        }
        registry
    }

    /// The built-ins plus every `*.toml` in `dir`.
    pub fn with_dir(dir: &Path) -> Result<Self, Vec<Error>> {
        let mut registry = Self::builtin();
        let entries = std::fs::read_dir(dir).map_err(|e| {
            vec![Error {
                file: dir.display().to_string(),
                step: None,
                problem: format!("cannot read the definitions directory: {e}"),
            }]
        })?;
        let mut paths: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        let mut errors = Vec::new();
        for path in paths {
            match load_file(&path) {
                Ok(def) => {
                    let name = path.display().to_string();
                    if let Some(existing) = registry.get(&def.name, def.version) {
                        if **existing != def {
                            errors.push(Error {
                                file: name,
                                step: None,
                                problem: format!(
                                    "{} version {} is already defined differently; bump the version",
                                    def.name, def.version
                                ),
                            });
                        }
                        continue;
                    }
                    registry.insert(def);
                }
                Err(mut e) => errors.append(&mut e),
            }
        }
        if errors.is_empty() {
            Ok(registry)
        } else {
            Err(errors)
        }
    }

    /// Adds a definition.
    pub fn insert(&mut self, def: Definition) {
        self.by_name
            .entry(def.name.clone())
            .or_default()
            .insert(def.version, Arc::new(def));
    }

    /// One version of a definition.
    pub fn get(&self, name: &str, version: u32) -> Option<&Arc<Definition>> {
        self.by_name.get(name)?.get(&version)
    }

    /// The newest version of a definition: what new sagas start with.
    pub fn latest(&self, name: &str) -> Option<&Arc<Definition>> {
        self.by_name.get(name)?.values().next_back()
    }

    /// Refuses definitions that wait longer than storage keeps what they wait
    /// on: a timer or command older than `retention` (the timers' and
    /// commands' max age) is deleted before it is due, so a deadline, step
    /// timeout or backoff must be shorter.
    ///
    /// # Errors
    ///
    /// One error per wait that is too long, naming the definition and step.
    pub fn check_storage(
        &self,
        streams: &jetsaga_runtime::streams::Streams,
    ) -> Result<(), Vec<Error>> {
        let retention = streams.retention;
        let mut errors = Vec::new();
        let too_long = |what: &str, wait: std::time::Duration| {
            (wait >= retention).then(|| {
                format!(
                    "{what} {} is not shorter than streams.retention ({}): its timer or \
                     command would be deleted before it is due",
                    humantime::format_duration(wait),
                    humantime::format_duration(retention)
                )
            })
        };
        for def in self.all() {
            let file = format!("{} v{}", def.name, def.version);
            let mut push = |step: Option<&str>, problem: Option<String>| {
                if let Some(problem) = problem {
                    errors.push(Error {
                        file: file.clone(),
                        step: step.map(str::to_owned),
                        problem,
                    });
                }
            };
            push(None, too_long("deadline", def.deadline));
            push(
                None,
                too_long(
                    "compensation-retry.max-backoff",
                    def.compensation_retry.max_backoff,
                ),
            );
            for step in &def.steps {
                push(Some(&step.name), too_long("timeout", step.timeout));
                push(
                    Some(&step.name),
                    (step.timeout >= streams.command_ttl).then(|| {
                        format!(
                            "timeout {} is not shorter than streams.command-ttl ({}): its \
                             command would expire before the step times out",
                            humantime::format_duration(step.timeout),
                            humantime::format_duration(streams.command_ttl)
                        )
                    }),
                );
                push(
                    Some(&step.name),
                    too_long("retry.max-backoff", step.retry.max_backoff),
                );
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Every definition, every version.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Definition>> {
        self.by_name.values().flat_map(|versions| versions.values())
    }
}

/// Reads and validates one definition file, and the schema files it names (beside it).
pub fn load_file(path: &Path) -> Result<Definition, Vec<Error>> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Error {
            file: name.clone(),
            step: None,
            problem: format!("cannot read: {e}"),
        }]
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    Definition::parse_with(&name, &text, |schema| {
        std::fs::read_to_string(dir.join(schema))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_that_wait_longer_than_storage_keeps_are_refused() {
        use jetsaga_runtime::streams::Streams;
        let registry = Registry::builtin();
        let keeping = |retention: u64, command_ttl: u64| Streams {
            retention: std::time::Duration::from_secs(retention),
            command_ttl: std::time::Duration::from_secs(command_ttl),
            ..Streams::default()
        };
        registry.check_storage(&Streams::default()).unwrap();
        // order-creation's deadline is longer than 2 minutes.
        let errors = registry.check_storage(&keeping(120, 120)).unwrap_err();
        let deadline = errors
            .iter()
            .find(|e| e.step.is_none() && e.problem.starts_with("deadline"))
            .expect("the deadline is named");
        assert_eq!(deadline.file, "order-creation v1");
        assert!(
            deadline.problem.contains("streams.retention (2m)"),
            "{deadline:?}"
        );
        // A step whose timeout alone exceeds it is named with its step.
        let errors = registry.check_storage(&keeping(5, 5)).unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.step.as_deref() == Some("reserve-stock")
                    && e.problem.starts_with("timeout")),
            "{errors:?}"
        );
        // A step timeout the commands' TTL does not outlast (order-creation's are 10 s).
        let errors = registry
            .check_storage(&keeping(7 * 24 * 3600, 10))
            .unwrap_err();
        assert!(
            errors
                .iter()
                .all(|e| e.problem.contains("streams.command-ttl (10s)")),
            "{errors:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.step.as_deref() == Some("take-payment")),
            "{errors:?}"
        );
    }

    #[test]
    fn builtin_directory_and_versions() {
        let registry = Registry::builtin();
        assert_eq!(registry.latest("order-creation").unwrap().version, 1);
        assert!(order_creation().unwrap().input_schema.is_some());

        let dir = tempfile::tempdir().unwrap();
        let v2 = ORDER_CREATION.replace("version = 1", "version = 2");
        std::fs::write(dir.path().join("order-v2.toml"), &v2).unwrap();
        std::fs::write(
            dir.path().join(ORDER_CREATION_INPUT_SCHEMA_FILE),
            ORDER_CREATION_INPUT_SCHEMA,
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let registry = Registry::with_dir(dir.path()).unwrap();
        assert_eq!(registry.latest("order-creation").unwrap().version, 2);
        assert!(registry.get("order-creation", 1).is_some());
        assert_eq!(registry.all().count(), 2);

        let changed = ORDER_CREATION.replace("deadline = \"5m\"", "deadline = \"9m\"");
        std::fs::write(dir.path().join("clash.toml"), changed).unwrap();
        let errors = Registry::with_dir(dir.path()).unwrap_err();
        assert!(
            errors[0]
                .to_string()
                .contains("already defined differently"),
            "{errors:?}"
        );
    }

    #[test]
    fn schema_files_are_read_beside_the_definition() {
        let dir = tempfile::tempdir().unwrap();
        let defs = dir.path().join("defs");
        std::fs::create_dir(&defs).unwrap();
        let text = ORDER_CREATION
            .replace("name = \"order-creation\"", "name = \"other\"")
            .replace(ORDER_CREATION_INPUT_SCHEMA_FILE, "other.json");
        std::fs::write(defs.join("other.toml"), &text).unwrap();
        let errors = Registry::with_dir(&defs).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let problem = errors[0].to_string();
        assert!(
            problem.contains("other.toml: input-schema \"other.json\": cannot read"),
            "{problem}"
        );

        std::fs::write(
            defs.join("other.json"),
            r#"{"type": "object", "required": ["id"]}"#,
        )
        .unwrap();
        let registry = Registry::with_dir(&defs).unwrap();
        let other = registry.latest("other").unwrap();
        assert!(other.check_input(&serde_json::json!({"id": 1})).is_ok());
        assert!(other.check_input(&serde_json::json!({})).is_err());

        std::fs::write(defs.join("other.json"), r#"{"type": "objet"}"#).unwrap();
        let errors = Registry::with_dir(&defs).unwrap_err();
        let problem = errors[0].to_string();
        assert!(
            problem.contains(
                "other.toml: input-schema \"other.json\": not a valid JSON Schema at /type"
            ),
            "{problem}"
        );
    }
}
