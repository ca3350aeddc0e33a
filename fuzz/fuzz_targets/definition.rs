//! Definition loading on any text (the TOML up to the first NUL byte), with the shipped
//! input schema as the only schema file; a definition that loads then runs a saga under the
//! property tests' checker (`sagas/tests/checker`), driven by the bytes after the NUL. Loading
//! must refuse with errors naming the file, never panic; a saga of any definition that loads
//! must keep the machine's invariants.
#![no_main]

#[path = "../../sagas/tests/checker/mod.rs"]
#[allow(dead_code)]
mod checker;
mod ops;

use arbitrary::Unstructured;
use jetsaga_sagas::Definition;
use jetsaga_sagas::definition::{format_duration, parse_duration};
use libfuzzer_sys::fuzz_target;

const SCHEMA_FILE: &str = "order-creation.input.schema.json";
const SCHEMA: &str = include_str!("../../sagas/definitions/order-creation.input.schema.json");

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let Ok(text) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    if let Ok(d) = parse_duration(text) {
        let formatted = format_duration(d);
        // Formatting keeps milliseconds.
        let ms = std::time::Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if ms == d {
            assert_eq!(parse_duration(&formatted), Ok(d), "{formatted}");
        }
    }
    let loaded = Definition::parse_with("fuzz.toml", text, |name| {
        if name == SCHEMA_FILE {
            Ok(SCHEMA.to_owned())
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file",
            ))
        }
    });
    let def = match loaded {
        Ok(def) => def,
        Err(errors) => {
            assert!(!errors.is_empty(), "refused without an error");
            for error in &errors {
                assert!(error.to_string().contains("fuzz.toml"), "{error}");
            }
            return;
        }
    };
    for (i, step) in def.steps.iter().enumerate() {
        assert_eq!(def.step_index(&step.name), Some(i));
    }
    let input = [checker::order_input(), serde_json::json!({})]
        .into_iter()
        .find(|input| def.check_input(input).is_ok());
    if let Some(input) = input {
        let rest = data.get(split + 1..).unwrap_or_default();
        let ops = ops::ops(&mut Unstructured::new(rest));
        checker::check(def, input, &ops);
    }
});
