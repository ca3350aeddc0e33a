//! Starting a saga: check the input, send the first command.

use chrono::{DateTime, Utc};

use super::action::after;
use super::{Action, Actor, Cause, Entry, Phase, Saga, State, StepRecord, Transition, Wait};
use crate::definition::Definition;
use crate::protocol::Direction;
use crate::schema::Invalid;

impl Saga {
    /// Starts a saga: checks the input against the definition's input schema, then
    /// sends the first command. The definition has at least one step (parsing
    /// guarantees it).
    pub fn start(
        def: &Definition,
        id: String,
        key: String,
        input: serde_json::Value,
        traceparent: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<(Saga, Transition), Invalid> {
        def.check_input(&input)?;
        let deadline = chrono::Duration::from_std(def.deadline).unwrap_or(chrono::Duration::MAX);
        let mut steps: Vec<StepRecord> =
            def.steps.iter().map(|s| StepRecord::new(&s.name)).collect();
        let first = &def.steps[0];
        let attempt = steps[0].begin_attempt(now);
        let saga = Saga {
            id,
            saga_type: def.name.clone(),
            version: def.version,
            key,
            input,
            traceparent,
            caller_traceparent: None,
            created_at: now,
            updated_at: now,
            deadline_at: now
                .checked_add_signed(deadline)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            transitions: 1,
            steps,
            state: State::Running {
                step: 0,
                wait: Wait::Reply {
                    attempt,
                    timeout_at: after(now, first.timeout),
                },
            },
        };
        let mut actions = vec![saga.command(def, 0, Direction::Forward, &first.action, attempt)];
        if let Some(at) = saga.next_timer(def) {
            actions.push(Action::SetTimer { at });
        }
        let entry = Entry {
            seq: 1,
            at: now,
            actor: Actor::Orchestrator,
            cause: Cause::Start,
            step: Some(first.name.clone()),
            command_id: None,
            from: None,
            to: Phase::Running,
            error: None,
            operator: None,
        };
        Ok((saga, Transition { entry, actions }))
    }
}
