//! `Saga::apply` on the shipped order-creation definition, driven by any sequence of inputs
//! (answers to the current, earlier, future and foreign commands, any text as a command id,
//! duplicates, wakes at any time, operator retries and aborts). After every input the
//! property tests' checker (`sagas/tests/checker`) asserts the machine's invariants: a
//! rejected input changes nothing, a finished saga stays finished, only steps that may have
//! been applied are compensated, in reverse order, never past the pivot, the timer is the
//! saga's, the saga survives a JSON round trip; then answering everything with success must
//! finish the saga.
#![no_main]

#[path = "../../sagas/tests/checker/mod.rs"]
#[allow(dead_code)]
mod checker;
mod ops;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ops = ops::ops(&mut Unstructured::new(data));
    if std::env::var_os("JETSAGA_FUZZ_DEBUG").is_some() {
        eprintln!("{ops:?}");
    }
    checker::check(checker::order_definition(), checker::order_input(), &ops);
});
