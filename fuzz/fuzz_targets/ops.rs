//! Input sequences for the saga checker (`sagas/tests/checker`), read from fuzzer bytes.

use arbitrary::{Result, Unstructured};

use crate::checker::{Answer, Op};

fn answer(u: &mut Unstructured<'_>) -> Result<Answer> {
    Ok(match u.int_in_range(0..=6u8)? {
        0..=3 => Answer::Ok,
        4 | 5 => Answer::Retryable,
        _ => Answer::Final,
    })
}

fn op(u: &mut Unstructured<'_>) -> Result<Op> {
    Ok(match u.int_in_range(0..=10u8)? {
        0 | 1 => Op::Current(answer(u)?),
        2 => Op::Other {
            step: u.int_in_range(0..=7)?,
            undo: u.arbitrary()?,
            attempt: u.arbitrary()?,
            answer: answer(u)?,
        },
        3 => Op::Earlier {
            pick: u.arbitrary()?,
            answer: answer(u)?,
        },
        4 => Op::Replay {
            pick: u.arbitrary()?,
        },
        5 => Op::Foreign(u.int_in_range(0..=2)?),
        6 => Op::Raw {
            command_id: u.arbitrary()?,
            answer: answer(u)?,
        },
        // Up to ten years: a clock at the end of representable time (where every timer
        // saturates to the same instant) is not one a saga meets.
        7 => Op::Wake {
            after_ms: u.int_in_range(0..=315_360_000_000)?,
        },
        8 => Op::WakeDue,
        9 => Op::Retry,
        _ => Op::Abort,
    })
}

/// Up to 200 inputs.
pub(crate) fn ops(u: &mut Unstructured<'_>) -> Vec<Op> {
    let mut ops = Vec::new();
    while ops.len() < 200 {
        match op(u) {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
    }
    ops
}
