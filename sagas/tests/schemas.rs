//! The JSON Schemas published beside `docs/PROTOCOL.md` agree with the Rust wire types: real
//! values of the types (every outcome variant included) and the document's examples are valid,
//! and a message missing a required field, or with a field of the wrong type, is rejected by
//! both the schema and the Rust decoder.

#![allow(clippy::unwrap_used)]

use chrono::TimeZone;
use jetsaga_sagas::protocol::{self, Body, Command, Event, Failure, Outcome, Reply, Start};
use serde_json::{Value, json};

const COMMAND: &str = include_str!("../../docs/schemas/command.schema.json");
const REPLY: &str = include_str!("../../docs/schemas/reply.schema.json");
const START: &str = include_str!("../../docs/schemas/start.schema.json");
const EVENT: &str = include_str!("../../docs/schemas/event.schema.json");
const DEAD_LETTER: &str = include_str!("../../docs/schemas/dead-letter.schema.json");
const PROTOCOL_MD: &str = include_str!("../../docs/PROTOCOL.md");

fn validator(schema: &str) -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(schema).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

/// Asserts `value` is valid, naming every violation otherwise.
fn assert_valid(validator: &jsonschema::Validator, value: &Value) {
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{value}: {errors:?}");
}

/// Whether the Rust decoder accepts `value` as a `T`.
fn decodes<T: Body>(value: &Value) -> bool {
    T::decode(value.to_string().as_bytes()).is_ok()
}

/// One kind of message: its schema, real values, the fields a message must have.
struct Kind {
    name: &'static str,
    validator: jsonschema::Validator,
    decodes: fn(&Value) -> bool,
    samples: Vec<Value>,
}

fn command(compensation: bool, attempt: u32, input: Value) -> Command {
    let saga_id = "0194f0c1-7a2b-7c3d-9e4f-0123456789ab".to_owned();
    let direction = if compensation {
        protocol::Direction::Compensate
    } else {
        protocol::Direction::Forward
    };
    let command_id = protocol::CommandId {
        saga_id: saga_id.clone(),
        step: "reserve-stock".into(),
        direction,
        attempt,
    }
    .to_string();
    Command {
        protocol: protocol::VERSION,
        reply_to: protocol::subject::reply("inventory", &command_id),
        command_id,
        saga_id,
        saga_type: "order-creation".into(),
        step: "reserve-stock".into(),
        action: if compensation { "release" } else { "reserve" }.into(),
        compensation,
        attempt,
        input,
    }
}

fn reply(outcome: Outcome) -> Reply {
    Reply {
        protocol: protocol::VERSION,
        command_id: "0194f0c1:reserve-stock:do:1".into(),
        saga_id: "0194f0c1".into(),
        outcome,
    }
}

fn to_value<T: Body>(body: &T) -> Value {
    serde_json::from_slice(&body.encode()).unwrap()
}

fn kinds() -> Vec<Kind> {
    let order = json!({"customer_id": "c-42", "email": "ana@example.com",
        "items": [{"sku": "sku-1", "quantity": 2}], "amount_cents": 4999,
        "currency": "EUR", "card_token": "tok_ok"});
    let at = chrono::Utc.with_ymd_and_hms(2025, 1, 1, 12, 0, 0).unwrap();
    let event = |saga_type: &str, input: Value, occurred_at| Event {
        protocol: protocol::VERSION,
        event: "order.confirmed".into(),
        saga_id: "0194f0c1".into(),
        saga_type: saga_type.into(),
        key: "order-1".into(),
        input,
        occurred_at,
    };
    vec![
        Kind {
            name: "command",
            validator: validator(COMMAND),
            decodes: decodes::<Command>,
            samples: vec![
                to_value(&command(false, 1, order.clone())),
                to_value(&command(true, 12, order.clone())),
                to_value(&command(false, u32::MAX, Value::Null)),
            ],
        },
        Kind {
            name: "reply",
            validator: validator(REPLY),
            decodes: decodes::<Reply>,
            samples: vec![
                to_value(&reply(Outcome::Ok {
                    result: json!({"reserved": [{"sku": "sku-1", "quantity": 2}]}),
                })),
                to_value(&reply(Outcome::Ok {
                    result: Value::Null,
                })),
                to_value(&reply(Outcome::Failed {
                    error: Failure::new("card_declined", "the card was declined", false),
                })),
                to_value(&reply(Outcome::Failed {
                    error: Failure::new("retries_exhausted", "no answer after 5 deliveries", true),
                })),
            ],
        },
        Kind {
            name: "start",
            validator: validator(START),
            decodes: decodes::<Start>,
            samples: vec![
                to_value(&Start {
                    protocol: protocol::VERSION,
                    key: "order-2024-000123".into(),
                    input: order.clone(),
                    requested_at: None,
                }),
                to_value(&Start {
                    protocol: protocol::VERSION,
                    key: "k".into(),
                    input: Value::Null,
                    requested_at: None,
                }),
            ],
        },
        Kind {
            name: "event",
            validator: validator(EVENT),
            decodes: decodes::<Event>,
            samples: vec![
                to_value(&event("order-creation", order, at)),
                // Stock events have no saga type; times may carry fractions of a second.
                to_value(&event(
                    "",
                    json!({"sku": "sku-1", "available": 99, "threshold": 100}),
                    at + chrono::Duration::nanoseconds(123_456_789),
                )),
            ],
        },
    ]
}

#[test]
fn real_values_are_valid_and_incomplete_or_mistyped_messages_are_rejected_by_both() {
    for kind in kinds() {
        for sample in &kind.samples {
            assert_valid(&kind.validator, sample);
            assert!((kind.decodes)(sample), "{}: {sample}", kind.name);

            let Value::Object(fields) = sample else {
                panic!("{}: not an object", kind.name);
            };
            for field in fields.keys() {
                let mut without = sample.clone();
                without.as_object_mut().unwrap().remove(field);
                let schema_ok = kind.validator.is_valid(&without);
                let rust_ok = (kind.decodes)(&without);
                assert_eq!(
                    schema_ok, rust_ok,
                    "{} without {field}: schema {schema_ok}, Rust {rust_ok}",
                    kind.name
                );
                // Only a reply's `result` may be left out (it reads as null).
                let optional = kind.name == "reply" && field == "result";
                assert_eq!(rust_ok, optional, "{} without {field}", kind.name);

                // A value of the wrong type: a string field given a number, anything else a
                // string (`input` and `result` take any JSON, so they have no wrong type).
                if matches!(field.as_str(), "input" | "result") {
                    continue;
                }
                let mut mistyped = sample.clone();
                mistyped[field.as_str()] = if fields[field].is_string() {
                    json!(7)
                } else {
                    json!("7")
                };
                assert!(
                    !kind.validator.is_valid(&mistyped),
                    "{} with {field} mistyped: schema accepts",
                    kind.name
                );
                assert!(
                    !(kind.decodes)(&mistyped),
                    "{} with {field} mistyped: Rust accepts",
                    kind.name
                );
            }

            // Unknown fields are ignored by both; another protocol version is refused by both.
            let mut extra = sample.clone();
            extra["added_in_a_later_release"] = json!(true);
            assert_valid(&kind.validator, &extra);
            assert!((kind.decodes)(&extra), "{}: {extra}", kind.name);
            let mut newer = sample.clone();
            newer["protocol"] = json!(2);
            assert!(!kind.validator.is_valid(&newer), "{}", kind.name);
            assert!(!(kind.decodes)(&newer), "{}", kind.name);
        }
    }

    // A failed reply needs its whole error; an unknown outcome is refused.
    let reply_schema = validator(REPLY);
    let failed = to_value(&reply(Outcome::Failed {
        error: Failure::new("timeout", "no reply", true),
    }));
    for field in ["code", "message", "retryable"] {
        let mut without = failed.clone();
        without["error"].as_object_mut().unwrap().remove(field);
        assert!(!reply_schema.is_valid(&without), "error without {field}");
        assert!(!decodes::<Reply>(&without), "error without {field}");
    }
    let mut maybe = failed;
    maybe["outcome"] = json!("maybe");
    assert!(!reply_schema.is_valid(&maybe));
    assert!(!decodes::<Reply>(&maybe));
}

/// Every JSON example in the protocol document is valid for its message and decodes.
#[test]
fn the_documents_examples_are_valid() {
    let kinds = kinds();
    let by_name = |name: &str| kinds.iter().find(|k| k.name == name).unwrap();
    let mut checked = 0;
    for block in PROTOCOL_MD.split("```json").skip(1) {
        let text = block.split("```").next().unwrap();
        let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let name = if value.get("outcome").is_some() {
            "reply"
        } else if value.get("action").is_some() {
            "command"
        } else if value.get("event").is_some() {
            "event"
        } else if value.get("key").is_some() {
            "start"
        } else {
            panic!("an example of no known message: {text}")
        };
        let kind = by_name(name);
        assert_valid(&kind.validator, &value);
        assert!((kind.decodes)(&value), "{name}: {value}");
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} examples found");
}

#[test]
fn dead_letter_headers() {
    let schema = validator(DEAD_LETTER);
    let copy = json!({
        "Jetsaga-Dead-Reason": "invalid Command: expected value at line 1 column 1",
        "Jetsaga-Dead-Subject": "saga.cmd.inventory.reserve",
        "Nats-Msg-Id": "0194f0c1:reserve-stock:do:1",
        "Jetsaga-Saga-Id": "0194f0c1",
    });
    assert_valid(&schema, &copy);
    for field in ["Jetsaga-Dead-Reason", "Jetsaga-Dead-Subject"] {
        let mut without = copy.clone();
        without.as_object_mut().unwrap().remove(field);
        assert!(!schema.is_valid(&without), "without {field}");
    }
    let mut two_lines = copy;
    two_lines["Jetsaga-Dead-Reason"] = json!("bad\njson");
    assert!(!schema.is_valid(&two_lines));
}
