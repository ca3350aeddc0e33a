//! JSON Schemas that check a saga's input and its steps' results.
//!
//! A definition carries its schemas as JSON values; [`Schema::compile`] checks that
//! a value is a valid schema (against its draft's meta-schema) and compiles it once.
//! [`Schema::check`] then names every violation, each with its JSON Pointer path.
//! Compiling never reads a file or the network: a `$ref` must point inside the schema.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// A compiled JSON Schema and the JSON it was compiled from.
#[derive(Clone)]
pub struct Schema {
    source: Value,
    validator: Arc<jsonschema::Validator>,
}

/// Why a value is not a valid JSON Schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid JSON Schema{}: {reason}", at(path))]
pub struct Broken {
    /// Where in the schema the problem is, as a JSON Pointer (empty: the whole schema).
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

/// One way a value fails a schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// Where in the value, as a JSON Pointer (`/items/0/quantity`; empty: the value itself).
    pub path: String,
    /// What is wrong there.
    pub reason: String,
}

/// A value that fails its schema, with every violation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid input: {}", list(.violations))]
pub struct Invalid {
    /// Every violation found, in the schema's order; never empty.
    pub violations: Vec<Violation>,
}

impl Schema {
    /// Checks that `source` is a valid JSON Schema and compiles it.
    pub fn compile(source: Value) -> Result<Self, Broken> {
        jsonschema::meta::validate(&source).map_err(|e| Broken {
            path: e.instance_path().to_string(),
            reason: e.to_string(),
        })?;
        let validator = jsonschema::validator_for(&source).map_err(|e| Broken {
            path: e.instance_path().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            source,
            validator: Arc::new(validator),
        })
    }

    /// The schema as written.
    pub fn source(&self) -> &Value {
        &self.source
    }

    /// Checks `value`, naming every violation.
    pub fn check(&self, value: &Value) -> Result<(), Invalid> {
        let violations: Vec<Violation> = self
            .validator
            .iter_errors(value)
            .map(|e| Violation {
                path: e.instance_path().to_string(),
                reason: e.to_string(),
            })
            .collect();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(Invalid { violations })
        }
    }
}

impl PartialEq for Schema {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Schema").field(&self.source).finish()
    }
}

impl Serialize for Schema {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.source.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Schema {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let source = Value::deserialize(deserializer)?;
        Self::compile(source).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        write!(f, "{path}: {}", self.reason)
    }
}

fn at(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!(" at {path}")
    }
}

fn list(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn names_every_violation_with_its_path() {
        let schema = Schema::compile(json!({
            "type": "object",
            "required": ["a", "b"],
            "additionalProperties": false,
            "properties": {
                "a": {"type": "integer", "minimum": 1},
                "b": {"type": "array", "items": {"type": "string"}}
            }
        }))
        .unwrap();
        assert_eq!(schema.check(&json!({"a": 1, "b": ["x"]})), Ok(()));
        let err = schema
            .check(&json!({"a": 0, "b": ["x", 2], "c": true}))
            .unwrap_err();
        let paths: Vec<&str> = err.violations.iter().map(|v| v.path.as_str()).collect();
        assert_eq!(paths.len(), 3, "{err}");
        for path in ["/a", "/b/1", ""] {
            assert!(paths.contains(&path), "{path} in {paths:?}");
        }
        let text = err.to_string();
        assert!(text.starts_with("invalid input: "), "{text}");
        assert!(
            text.contains("/a: 0 is less than the minimum of 1"),
            "{text}"
        );
        assert!(text.contains("'c' was unexpected"), "{text}");

        let missing = schema.check(&json!({})).unwrap_err();
        assert_eq!(missing.violations.len(), 2, "{missing}");
        assert!(missing.violations.iter().all(|v| v.path.is_empty()));
    }

    #[test]
    fn rejects_a_broken_schema_naming_where() {
        let broken =
            Schema::compile(json!({"type": "object", "properties": {"a": {"type": "strin"}}}))
                .unwrap_err();
        assert_eq!(broken.path, "/properties/a/type");
        assert!(
            broken
                .to_string()
                .starts_with("not a valid JSON Schema at /properties/a/type")
        );
        assert!(Schema::compile(json!({"minimum": "one"})).is_err());
        assert!(Schema::compile(json!({"pattern": "("})).is_err());
        // No I/O: a reference outside the schema cannot be resolved.
        assert!(Schema::compile(json!({"$ref": "https://example.invalid/s.json"})).is_err());
    }

    #[test]
    fn serde_keeps_the_source() {
        let schema = Schema::compile(json!({"type": "string"})).unwrap();
        let text = serde_json::to_string(&schema).unwrap();
        assert_eq!(text, r#"{"type":"string"}"#);
        let back: Schema = serde_json::from_str(&text).unwrap();
        assert_eq!(back, schema);
        assert!(serde_json::from_str::<Schema>(r#"{"type": 5}"#).is_err());
    }
}
