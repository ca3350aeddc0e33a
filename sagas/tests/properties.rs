//! Property tests of the saga state machine: random input sequences (answers to
//! current, old, future and foreign commands, duplicates, wakes at random times,
//! operator retries and aborts) on the shipped order definition and on generated
//! definitions of 2 to 5 steps, checking the machine's invariants after every
//! input (`checker`); then answering everything with success must finish the saga.

mod checker;

use checker::{Answer, Op, Shape, check, order_definition, order_input};
use jetsaga_sagas::Definition;
use proptest::prelude::*;
use serde_json::json;

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![4 => Just(Answer::Ok), 2 => Just(Answer::Retryable), 1 => Just(Answer::Final)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => answer().prop_map(Op::Current),
        2 => (0..5usize, any::<bool>(), 0..5u32, answer())
            .prop_map(|(step, undo, attempt, answer)| Op::Other { step, undo, attempt, answer }),
        2 => (any::<usize>(), answer()).prop_map(|(pick, answer)| Op::Earlier { pick, answer }),
        2 => any::<usize>().prop_map(|pick| Op::Replay { pick }),
        1 => (0..3u8).prop_map(Op::Foreign),
        1 => (".{0,40}", answer()).prop_map(|(command_id, answer)| Op::Raw { command_id, answer }),
        2 => (0..4_000u64).prop_map(|after_ms| Op::Wake { after_ms }),
        // Long enough to pass any deadline, the shipped five minutes included.
        1 => (0..600_000u64).prop_map(|after_ms| Op::Wake { after_ms }),
        5 => Just(Op::WakeDue),
        1 => Just(Op::Retry),
        1 => Just(Op::Abort),
    ]
}

fn shape() -> impl Strategy<Value = Shape> {
    (2..=5usize)
        .prop_flat_map(|steps| {
            (
                Just(steps),
                proptest::option::of(0..steps),
                any::<bool>(),
                proptest::collection::vec(1..=3u32, steps),
                1..=3u32,
                proptest::collection::vec(100..=3_000u64, steps),
                prop_oneof![Just(0.0), Just(0.2), Just(0.5)],
                500..=20_000u64,
            )
        })
        .prop_map(
            |(
                steps,
                pivot,
                pivot_compensation,
                max_attempts,
                compensation_attempts,
                timeouts_ms,
                jitter,
                deadline_ms,
            )| {
                Shape {
                    steps,
                    pivot,
                    pivot_compensation,
                    max_attempts,
                    compensation_attempts,
                    timeouts_ms,
                    jitter,
                    deadline_ms,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn order_saga_keeps_its_invariants(ops in proptest::collection::vec(op(), 0..60)) {
        check(order_definition(), order_input(), &ops);
    }

    #[test]
    fn generated_sagas_keep_their_invariants(
        shape in shape(),
        ops in proptest::collection::vec(op(), 0..80),
    ) {
        let text = shape.toml();
        let def = match Definition::parse("generated.toml", &text) {
            Ok(def) => def,
            Err(errors) => panic!("{errors:?}\n{text}"),
        };
        check(def, json!({}), &ops);
    }
}
