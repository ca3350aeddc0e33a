//! The definitions the orchestrator knows, by name and version.
//!
//! order-creation ships built in; a definitions directory adds more, or newer
//! versions. A running saga keeps running the version it started with.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use jetsaga_sagas::Definition;
use jetsaga_sagas::definition::Error;

/// The built-in order-creation definition, as shipped in `sagas/definitions/`.
pub const ORDER_CREATION: &str = include_str!("../../sagas/definitions/order-creation.toml");

/// Definitions by name and version.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    by_name: BTreeMap<String, BTreeMap<u32, Arc<Definition>>>,
}

impl Registry {
    /// The built-in definitions.
    pub fn builtin() -> Self {
        let mut registry = Self::default();
        // The shipped file is validated by the sagas crate's tests; an error here
        // would be a build defect, and is reported the same way as any file's.
        if let Ok(def) = Definition::parse("order-creation.toml", ORDER_CREATION) {
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

    /// Every definition, every version.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Definition>> {
        self.by_name.values().flat_map(|versions| versions.values())
    }
}

/// Reads and validates one definition file.
pub fn load_file(path: &Path) -> Result<Definition, Vec<Error>> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Error {
            file: name.clone(),
            step: None,
            problem: format!("cannot read: {e}"),
        }]
    })?;
    Definition::parse(&name, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_directory_and_versions() {
        let registry = Registry::builtin();
        assert_eq!(registry.latest("order-creation").unwrap().version, 1);

        let dir = tempfile::tempdir().unwrap();
        let v2 = ORDER_CREATION.replace("version = 1", "version = 2");
        std::fs::write(dir.path().join("order-v2.toml"), &v2).unwrap();
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
}
