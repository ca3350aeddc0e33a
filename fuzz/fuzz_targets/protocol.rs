//! The protocol decoders, on any bytes: commands (what participants decode), replies and
//! starts (what the orchestrator's reply and start consumers decode, including the command
//! id and the start input's schema check), events (what the notification service decodes),
//! and the header and subject parsers. Nothing may panic; whatever decodes must encode and
//! decode back to the same value.
#![no_main]

mod shipped;

use jetsaga_sagas::protocol::{
    Body, Command, CommandId, Event, Reply, Start, TraceParent, subject,
};
use libfuzzer_sys::fuzz_target;
use shipped::ORDER;

fn round_trip<T: Body + PartialEq + std::fmt::Debug>(decoded: &T) {
    let again = T::decode(&decoded.encode()).expect("an encoded body decodes");
    assert_eq!(&again, decoded, "a body changed through encode and decode");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(command) = Command::decode(data) {
        round_trip(&command);
    }
    if let Ok(reply) = Reply::decode(data) {
        round_trip(&reply);
        // What the reply consumer does next.
        if let Ok(id) = CommandId::parse(&reply.command_id) {
            assert_eq!(CommandId::parse(&id.to_string()), Ok(id));
        }
    }
    if let Ok(start) = Start::decode(data) {
        round_trip(&start);
        // What the start consumer does next: a schema check that names every violation.
        if let Err(invalid) = ORDER.check_input(&start.input) {
            assert!(
                !invalid.violations.is_empty(),
                "a refusal names no violation"
            );
        }
    }
    if let Ok(event) = Event::decode(data) {
        round_trip(&event);
    }
    // Headers and subjects arrive as text.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(id) = CommandId::parse(text) {
            assert_eq!(CommandId::parse(&id.to_string()), Ok(id));
        }
        if let Some(tp) = TraceParent::parse(text) {
            let child = tp.with_span(1);
            assert!(TraceParent::parse(&child).is_some(), "{child}");
        }
        if let Some(saga_type) = subject::start_type(text) {
            assert_eq!(subject::start(saga_type), text);
        }
        if let Some(saga_id) = subject::fired_saga(text) {
            assert_eq!(subject::timer_fire(saga_id), text);
        }
    }
});
