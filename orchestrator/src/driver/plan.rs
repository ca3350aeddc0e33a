//! What a transition's actions amount to on the wire, with no I/O.

use chrono::{DateTime, Timelike, Utc};
use jetsaga_sagas::Action;

use crate::record::{Effect, Outbound, outbound};

/// The writes one transition implies.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// The effects its record keeps.
    pub(crate) effects: Vec<Effect>,
    /// The commands and events to publish after the record, in order.
    pub(crate) messages: Vec<Outbound>,
    /// A timer to arm before the record is stored.
    pub(crate) set_timer: Option<DateTime<Utc>>,
    /// Whether to clear the timer after the messages.
    pub(crate) clear_timer: bool,
    /// The saga's armed timer once the writes are done.
    pub(crate) timer_at: Option<DateTime<Utc>>,
}

/// Plans the writes of `actions`, given the timer armed before them.
///
/// Timers only ever move earlier on the wire: a later due time is served by
/// letting the armed timer fire early (a stale wake re-arms for what is really
/// due), which spares one timer write per step.
pub(crate) fn plan(
    actions: &[Action],
    armed: Option<DateTime<Utc>>,
    traceparent: Option<&str>,
) -> Plan {
    let mut plan = Plan {
        timer_at: armed,
        ..Plan::default()
    };
    for action in actions {
        match action {
            Action::Send { .. } | Action::Publish { .. } => {
                if let Some((effect, message)) = outbound(action, traceparent) {
                    plan.effects.push(effect);
                    plan.messages.push(message);
                }
            }
            Action::SetTimer { at } => {
                let at = round_up(*at);
                if plan.timer_at.is_none_or(|armed| at < armed) {
                    plan.set_timer = Some(at);
                    plan.timer_at = Some(at);
                }
            }
            Action::ClearTimer => {
                plan.clear_timer = plan.timer_at.is_some();
                plan.timer_at = None;
            }
            Action::Finish { .. } | Action::Park { .. } => {}
        }
    }
    plan
}

/// Schedules fire to the millisecond; rounding up to a whole millisecond (plus a
/// little) keeps a timer from firing just before what it waits for is due.
pub(crate) fn round_up(at: DateTime<Utc>) -> DateTime<Utc> {
    let millis = at.timestamp_millis() + 1 + i64::from(!at.nanosecond().is_multiple_of(1_000_000));
    DateTime::from_timestamp_millis(millis).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use jetsaga_sagas::End;

    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn timers_round_up_to_the_next_millisecond() {
        assert_eq!(
            round_up(at("2026-01-01T00:00:01.2004Z")).to_rfc3339(),
            "2026-01-01T00:00:01.202+00:00"
        );
        assert_eq!(
            round_up(at("2026-01-01T00:00:01Z")).to_rfc3339(),
            "2026-01-01T00:00:01.001+00:00"
        );
    }

    #[test]
    fn timers_only_move_earlier_and_clear_only_when_armed() {
        let t1 = at("2026-01-01T00:00:01Z");
        let t2 = at("2026-01-01T00:00:02Z");
        let set = |at| Action::SetTimer { at };

        // Nothing armed: arm.
        let p = plan(&[set(t2)], None, None);
        assert_eq!(p.set_timer, Some(round_up(t2)));
        assert_eq!(p.timer_at, Some(round_up(t2)));
        assert!(!p.clear_timer);

        // Armed earlier: keep it, write nothing.
        let p = plan(&[set(t2)], Some(round_up(t1)), None);
        assert_eq!(p.set_timer, None);
        assert_eq!(p.timer_at, Some(round_up(t1)));

        // Armed later: move it earlier.
        let p = plan(&[set(t1)], Some(round_up(t2)), None);
        assert_eq!(p.set_timer, Some(round_up(t1)));
        assert_eq!(p.timer_at, Some(round_up(t1)));

        // The same time again is no move.
        let p = plan(&[set(t1)], Some(round_up(t1)), None);
        assert_eq!(p.set_timer, None);

        // Clearing: a write only if a timer is armed.
        let p = plan(
            &[
                Action::ClearTimer,
                Action::Finish {
                    end: End::Completed,
                },
            ],
            Some(t1),
            None,
        );
        assert!(p.clear_timer);
        assert_eq!(p.timer_at, None);
        let p = plan(&[Action::ClearTimer], None, None);
        assert!(!p.clear_timer);
        assert!(p.effects.is_empty() && p.messages.is_empty());
    }

    #[test]
    fn commands_and_events_become_effects_and_messages_in_order() {
        let now = at("2026-01-01T00:00:00Z");
        let (_, saga, start) = crate::record::started_order("s1", "tok_ok", Some("00-a-b-01"), now);
        let event = saga.event("order.created", now);
        let mut actions = start.actions;
        actions.push(event);
        let p = plan(&actions, None, saga.traceparent.as_deref());
        assert_eq!(
            p.effects,
            vec![
                Effect::Command {
                    id: "s1:reserve-stock:do:1".into()
                },
                Effect::Event {
                    name: "order.created".into(),
                    at: now
                }
            ]
        );
        assert_eq!(p.messages.len(), 2);
        assert_eq!(p.messages[0].msg_id, "s1:reserve-stock:do:1");
        assert!(p.messages[0].headers.iter().any(|(name, value)| *name
            == jetsaga_sagas::protocol::header::TRACEPARENT
            && value == "00-a-b-01"));
        assert!(p.set_timer.is_some(), "the step timeout is armed");
    }
}
