//! The journal record decoder (`orchestrator/src/record.rs`), on any bytes, and what the
//! driver does with a record it loads: rebuild its effects' messages, read its timer and
//! current step, and apply inputs to its saga. A record that decodes must survive all of it
//! (a corrupt record is refused with an error, never a panic), and encode back to itself.
#![no_main]

// The journal record module itself, without the rest of the orchestrator (no I/O in it).
#[path = "../../orchestrator/src/record.rs"]
#[allow(dead_code)]
mod record;
mod shipped;

use chrono::{DateTime, Utc};
use jetsaga_sagas::Input;
use jetsaga_sagas::protocol::{Failure, Outcome};
use libfuzzer_sys::fuzz_target;
use record::{Record, rebuild};
use shipped::ORDER;

fuzz_target!(|data: &[u8]| {
    let Ok(record) = Record::decode(data) else {
        return;
    };
    let encoded = record.encode().expect("a decoded record encodes");
    let again = Record::decode(&encoded).expect("an encoded record decodes");
    assert_eq!(
        again.encode().expect("encodes"),
        encoded,
        "a record changed through encode and decode"
    );
    let _ = record.journal();
    let saga = &record.saga;
    let _ = (saga.phase(), saga.current_step(), saga.trace_id());
    let def = &*ORDER;
    if saga.saga_type != def.name || saga.version != def.version {
        return;
    }
    // The driver's path for a loaded record: complete its effects, then apply the input.
    let _ = rebuild(&record, def);
    let now = saga.updated_at;
    let _ = saga.next_timer(def);
    let later: DateTime<Utc> = now
        .checked_add_signed(chrono::Duration::hours(1))
        .unwrap_or(now);
    let mut inputs = vec![
        Input::Wake,
        Input::Retry {
            operator: "fuzz".into(),
        },
        Input::Abort {
            reason: "fuzz".into(),
            operator: "fuzz".into(),
        },
    ];
    for step in &def.steps {
        for direction in ["do", "undo"] {
            for attempt in 1..=2 {
                let command_id = format!("{}:{}:{direction}:{attempt}", saga.id, step.name);
                inputs.push(Input::Reply {
                    command_id: command_id.clone(),
                    outcome: Outcome::Ok {
                        result: serde_json::Value::Null,
                    },
                });
                inputs.push(Input::Reply {
                    command_id,
                    outcome: Outcome::Failed {
                        error: Failure::new("busy", "again", true),
                    },
                });
            }
        }
    }
    for input in inputs {
        for at in [now, later] {
            let mut copy = saga.clone();
            let before = copy.clone();
            match copy.apply(def, input.clone(), at) {
                Ok(_) => {
                    let _ = copy.next_timer(def);
                }
                Err(rejected) => {
                    assert_eq!(copy, before, "a rejected input changed the saga");
                    let _ = copy.ignored_entry(&input, &rejected, at);
                }
            }
            if let Input::Reply { command_id, .. } = &input {
                let _ = copy.resent(def, command_id, at);
                let _ = copy.resend(def, command_id);
            }
        }
    }
});
