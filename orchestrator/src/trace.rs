//! One trace per saga, derived from what the saga persists.
//!
//! The saga's `traceparent` names its root span. A step attempt's span id derives from
//! its command id ([`protocol::command_traceparent`]), and the command carries that
//! context, so the participant's span is the attempt's child whichever instance sent it.
//! Nothing is kept open in memory: when a transition is stored, the spans it ended are
//! emitted with the start times the saga recorded (`StepRecord::sent_at`, `created_at`):
//!
//! - the attempt (`<step>` or `compensate <step>`, `saga.compensation` true) when its
//!   reply was applied, it timed out, the deadline passed or an operator aborted it,
//!   with the timer, retry and timeout as events;
//! - `reply <step>`: the orchestrator applying and storing the reply, under the attempt;
//! - `resend <step>`: a recovery re-published the attempt's command;
//! - the root (`saga <type>`) when the saga finishes or parks as failed, from
//!   `created_at`, under the caller's context if the start carried one.
//!
//! With no OTLP endpoint there is no [`Tracer`] and none of this runs. A saga parked,
//! retried and then finished emits its root twice, with the same id.

use std::collections::HashMap;
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use jetsaga_sagas::protocol::{self, CommandId, Direction, TraceParent};
use jetsaga_sagas::{Cause, Definition, Entry, Phase, Saga, State, Wait};
use opentelemetry::trace::{
    Event, Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _,
    TraceFlags, TraceId, TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};

/// The instrumentation scope of the orchestrator's saga spans.
pub(crate) const SCOPE: &str = "jetsaga-orchestrator";

/// Emits saga spans through the installed OpenTelemetry provider.
pub(crate) struct Tracer {
    tracer: opentelemetry::global::BoxedTracer,
    /// The share of new sagas whose trace is recorded (`telemetry.sampling-ratio`).
    ratio: f64,
    /// The spans of the transition each saga is writing, emitted once it is stored.
    pending: HashMap<String, Vec<Finished>>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// A span whose times are known, not yet emitted.
#[derive(Debug)]
struct Finished {
    name: String,
    kind: SpanKind,
    trace_id: TraceId,
    span_id: SpanId,
    /// `None`: a root.
    parent: Option<SpanContext>,
    start: DateTime<Utc>,
    /// `None`: when the transition is stored.
    end: Option<DateTime<Utc>>,
    attributes: Vec<KeyValue>,
    events: Vec<Event>,
    error: Option<String>,
}

impl Tracer {
    /// A tracer on the global provider (installed by `jetsaga_runtime::telemetry::init`;
    /// without it, spans are built and dropped), recording `ratio` of the new sagas.
    pub(crate) fn global(ratio: f64) -> Self {
        Self {
            tracer: opentelemetry::global::tracer(SCOPE),
            ratio,
            pending: HashMap::new(),
        }
    }

    /// The trace context of a new saga's root span and the caller's context it
    /// descends from: the caller's trace (and sampling decision) if `caller` is a valid
    /// `traceparent`, else a new trace, sampled as the SDK's ratio sampler decides for
    /// its id, so the root (sampled by the SDK) and its children (which follow the
    /// persisted flag) agree.
    pub(crate) fn root(&self, caller: Option<&str>) -> (String, Option<String>) {
        let parsed = caller.and_then(TraceParent::parse);
        let span_id = random_u64();
        match parsed {
            Some(tp) => (tp.with_span(span_id), caller.map(str::to_owned)),
            None => {
                if let Some(caller) = caller {
                    tracing::debug!(
                        traceparent = caller,
                        "malformed traceparent on a start: a new trace"
                    );
                }
                let trace_id = uuid::Uuid::new_v4().as_u128().max(1);
                let flags = if sampled(self.ratio, trace_id) {
                    "01"
                } else {
                    "00"
                };
                (format!("00-{trace_id:032x}-{span_id:016x}-{flags}"), None)
            }
        }
    }

    /// A transition of `after` (from `before`, `None` for the start) was decided and
    /// is being written: the spans it ends wait for [`Tracer::written`].
    pub(crate) fn decided(
        &mut self,
        def: &Definition,
        before: Option<&Saga>,
        after: &Saga,
        entry: &Entry,
    ) {
        let Some(root) = after
            .traceparent
            .as_deref()
            .and_then(TraceParent::parse)
            .and_then(|tp| remote(tp.trace_id, tp.span_id, tp.flags))
            .filter(SpanContext::is_sampled)
        else {
            self.pending.remove(&after.id);
            return;
        };
        let mut spans = Vec::new();
        if let Some(before) = before
            && let Some(waited) = awaited(before)
        {
            if awaited(after) == Some(waited) {
                if entry.cause == Cause::Resent {
                    spans.push(resend(def, after, &root, waited, entry));
                }
            } else {
                spans.extend(attempt(def, before, after, &root, waited, entry));
            }
        }
        let phase = after.phase();
        if matches!(phase, Phase::Completed | Phase::Compensated | Phase::Failed)
            && before.is_none_or(|b| b.phase() != phase)
        {
            spans.push(saga_root(after, &root, entry));
        }
        if spans.is_empty() {
            self.pending.remove(&after.id);
        } else {
            self.pending.insert(after.id.clone(), spans);
        }
    }

    /// The saga's pending transition was stored (`stored`) or not: emit its spans, or
    /// forget them (the input is applied again, and decides them again).
    pub(crate) fn written(&mut self, saga_id: &str, stored: bool, now: DateTime<Utc>) {
        let Some(spans) = self.pending.remove(saga_id) else {
            return;
        };
        if !stored {
            return;
        }
        for span in spans {
            self.emit(span, now);
        }
    }

    fn emit(&self, span: Finished, now: DateTime<Utc>) {
        let parent = match span.parent {
            Some(parent) => Context::new().with_remote_span_context(parent),
            None => Context::new(),
        };
        let builder = SpanBuilder::from_name(span.name)
            .with_kind(span.kind)
            .with_start_time(SystemTime::from(span.start))
            .with_attributes(span.attributes)
            .with_events(span.events);
        let mut built = jetsaga_runtime::telemetry::with_ids(span.trace_id, span.span_id, || {
            self.tracer.build_with_context(builder, &parent)
        });
        built.set_status(match span.error {
            Some(error) => Status::error(error),
            None => Status::Ok,
        });
        built.end_with_timestamp(SystemTime::from(span.end.unwrap_or(now).max(span.start)));
    }
}

/// The command a saga waits for: (step, direction, attempt).
fn awaited(saga: &Saga) -> Option<(usize, Direction, u32)> {
    match &saga.state {
        State::Running {
            step,
            wait: Wait::Reply { attempt, .. },
        } => Some((*step, Direction::Forward, *attempt)),
        State::Compensating {
            step,
            wait: Wait::Reply { attempt, .. },
            ..
        } => Some((*step, Direction::Compensate, *attempt)),
        State::Running { .. }
        | State::Compensating { .. }
        | State::Completed
        | State::Compensated { .. }
        | State::Failed { .. } => None,
    }
}

/// The span of attempt `waited` of `before`, which the transition to `after` ended,
/// and the reply's when a reply ended it.
fn attempt(
    def: &Definition,
    before: &Saga,
    after: &Saga,
    root: &SpanContext,
    (index, direction, attempt): (usize, Direction, u32),
    entry: &Entry,
) -> Vec<Finished> {
    let spec = &def.steps[index];
    let command_id = CommandId {
        saga_id: before.id.clone(),
        step: spec.name.clone(),
        direction,
        attempt,
    }
    .to_string();
    let compensation = direction == Direction::Compensate;
    let record = &before.steps[index];
    let start = record
        .sent_at
        .or(record.started_at)
        .unwrap_or(entry.at)
        .min(entry.at);
    let mut events = vec![event(
        "command sent",
        start,
        vec![KeyValue::new(
            "saga.timeout_at",
            (start + chrono::Duration::from_std(spec.timeout).unwrap_or_default()).to_rfc3339(),
        )],
    )];
    let outcome = cause_name(entry.cause);
    match entry.cause {
        Cause::ReplyOk | Cause::ReplyFailed => events.push(event("reply", entry.at, vec![])),
        Cause::StepTimeout => events.push(event("timeout", entry.at, vec![])),
        Cause::Deadline => events.push(event("deadline passed", entry.at, vec![])),
        Cause::OperatorAbort => events.push(event("aborted", entry.at, vec![])),
        Cause::Start | Cause::RetryDue | Cause::OperatorRetry | Cause::Ignored | Cause::Resent => {}
    }
    let retry_at = match &after.state {
        State::Running {
            step,
            wait: Wait::Backoff { until, .. },
        } if *step == index && !compensation => Some(*until),
        State::Compensating {
            step,
            wait: Wait::Backoff { until, .. },
            ..
        } if *step == index && compensation => Some(*until),
        State::Running { .. }
        | State::Compensating { .. }
        | State::Completed
        | State::Compensated { .. }
        | State::Failed { .. } => None,
    };
    if let Some(at) = retry_at {
        events.push(event(
            "retry scheduled",
            entry.at,
            vec![KeyValue::new("saga.retry_at", at.to_rfc3339())],
        ));
    }
    let error = match entry.cause {
        Cause::ReplyOk => None,
        _ => Some(entry.error.clone().unwrap_or_else(|| outcome.to_owned())),
    };
    let span_id = SpanId::from(protocol::span_id_of(&command_id));
    let step_span = Finished {
        name: if compensation {
            format!("compensate {}", spec.name)
        } else {
            spec.name.clone()
        },
        kind: SpanKind::Producer,
        trace_id: root.trace_id(),
        span_id,
        parent: Some(root.clone()),
        start,
        end: Some(entry.at),
        attributes: vec![
            KeyValue::new("saga.id", before.id.clone()),
            KeyValue::new("saga.type", before.saga_type.clone()),
            KeyValue::new("saga.step", spec.name.clone()),
            KeyValue::new("saga.participant", spec.participant.clone()),
            KeyValue::new(
                "saga.action",
                if compensation {
                    spec.compensation.clone().unwrap_or_default()
                } else {
                    spec.action.clone()
                },
            ),
            KeyValue::new("saga.attempt", i64::from(attempt)),
            KeyValue::new("saga.compensation", compensation),
            KeyValue::new("saga.command_id", command_id.clone()),
            KeyValue::new("saga.outcome", outcome),
        ],
        events,
        error: error.clone(),
    };
    let mut spans = vec![];
    if matches!(entry.cause, Cause::ReplyOk | Cause::ReplyFailed) {
        let attempt_context = SpanContext::new(
            root.trace_id(),
            span_id,
            root.trace_flags(),
            true,
            TraceState::default(),
        );
        spans.push(Finished {
            name: format!("reply {}", spec.name),
            kind: SpanKind::Consumer,
            trace_id: root.trace_id(),
            span_id: SpanId::from(protocol::span_id_of(&format!("{command_id}/reply"))),
            parent: Some(attempt_context),
            start: entry.at,
            end: None,
            attributes: vec![
                KeyValue::new("saga.id", before.id.clone()),
                KeyValue::new("saga.command_id", command_id),
                KeyValue::new("saga.compensation", compensation),
                KeyValue::new("saga.transition", entry.seq as i64),
                KeyValue::new("saga.state", after.phase().as_str()),
            ],
            events: vec![],
            error,
        });
    }
    spans.insert(0, step_span);
    spans
}

/// A zero-length span under the attempt whose command a recovery re-published.
fn resend(
    def: &Definition,
    saga: &Saga,
    root: &SpanContext,
    (index, direction, attempt): (usize, Direction, u32),
    entry: &Entry,
) -> Finished {
    let step = &def.steps[index].name;
    let command_id = CommandId {
        saga_id: saga.id.clone(),
        step: step.clone(),
        direction,
        attempt,
    }
    .to_string();
    let parent = SpanContext::new(
        root.trace_id(),
        SpanId::from(protocol::span_id_of(&command_id)),
        root.trace_flags(),
        true,
        TraceState::default(),
    );
    Finished {
        name: format!("resend {step}"),
        kind: SpanKind::Producer,
        trace_id: root.trace_id(),
        span_id: SpanId::from(protocol::span_id_of(&format!(
            "{command_id}/resent/{}",
            entry.seq
        ))),
        parent: Some(parent),
        start: entry.at,
        end: Some(entry.at),
        attributes: vec![
            KeyValue::new("saga.id", saga.id.clone()),
            KeyValue::new("saga.command_id", command_id),
        ],
        events: vec![],
        error: None,
    }
}

/// The saga's root span, ended by the transition that finished or parked it.
fn saga_root(saga: &Saga, root: &SpanContext, entry: &Entry) -> Finished {
    let parent = saga
        .caller_traceparent
        .as_deref()
        .and_then(TraceParent::parse)
        .and_then(|tp| remote(tp.trace_id, tp.span_id, tp.flags))
        .filter(|caller| caller.trace_id() == root.trace_id());
    let phase = saga.phase();
    let mut events = Vec::new();
    let error = match &saga.state {
        State::Failed { error, .. } => {
            events.push(event("parked", entry.at, vec![]));
            Some(format!("{}: {}", error.code, error.message))
        }
        State::Running { .. }
        | State::Compensating { .. }
        | State::Completed
        | State::Compensated { .. } => None,
    };
    let mut attributes = vec![
        KeyValue::new("saga.id", saga.id.clone()),
        KeyValue::new("saga.type", saga.saga_type.clone()),
        KeyValue::new("saga.version", i64::from(saga.version)),
        KeyValue::new("saga.key", saga.key.clone()),
        KeyValue::new("saga.outcome", phase.as_str()),
        KeyValue::new("saga.transitions", saga.transitions as i64),
    ];
    if let State::Compensated { cause } | State::Failed { cause, .. } = &saga.state {
        attributes.push(KeyValue::new(
            "saga.cause",
            format!("{}: {}", cause.code, cause.message),
        ));
    }
    Finished {
        name: format!("saga {}", saga.saga_type),
        kind: SpanKind::Internal,
        trace_id: root.trace_id(),
        span_id: root.span_id(),
        parent,
        start: saga.created_at.min(entry.at),
        end: Some(entry.at),
        attributes,
        events,
        error,
    }
}

/// A remote span context from the parts of a `traceparent`.
fn remote(trace_id: &str, span_id: &str, flags: &str) -> Option<SpanContext> {
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(SpanContext::new(
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    ))
}

fn event(name: &'static str, at: DateTime<Utc>, attributes: Vec<KeyValue>) -> Event {
    Event::new(name, SystemTime::from(at), attributes, 0)
}

/// The SDK's `TraceIdRatioBased` decision for `trace_id`.
fn sampled(ratio: f64, trace_id: u128) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    ((trace_id as u64) >> 1) < bound
}

fn random_u64() -> u64 {
    (uuid::Uuid::new_v4().as_u128() as u64).max(1)
}

/// The journal's name of a cause.
fn cause_name(cause: Cause) -> &'static str {
    match cause {
        Cause::Start => "start",
        Cause::ReplyOk => "reply_ok",
        Cause::ReplyFailed => "reply_failed",
        Cause::StepTimeout => "step_timeout",
        Cause::RetryDue => "retry_due",
        Cause::Deadline => "deadline",
        Cause::OperatorRetry => "operator_retry",
        Cause::OperatorAbort => "operator_abort",
        Cause::Ignored => "ignored",
        Cause::Resent => "resent",
    }
}

#[cfg(test)]
mod tests {
    use jetsaga_sagas::Input;
    use jetsaga_sagas::protocol::{Failure, Outcome};

    use super::*;

    const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn ok() -> Outcome {
        Outcome::Ok {
            result: serde_json::json!({}),
        }
    }

    fn failed(retryable: bool) -> Outcome {
        Outcome::Failed {
            error: Failure::new("card_declined", "no", retryable),
        }
    }

    /// Applies `input` at `at` and lets the tracer see it; the spans it left pending.
    fn step(
        tracer: &mut Tracer,
        def: &Definition,
        saga: &mut Saga,
        input: Input,
        at: DateTime<Utc>,
    ) -> Vec<Finished> {
        let before = saga.clone();
        let transition = saga.apply(def, input, at).unwrap();
        tracer.decided(def, Some(&before), saga, &transition.entry);
        tracer.pending.remove(&saga.id).unwrap_or_default()
    }

    fn reply(id: &str, outcome: Outcome) -> Input {
        Input::Reply {
            command_id: id.to_owned(),
            outcome,
        }
    }

    fn attr<'a>(span: &'a Finished, key: &str) -> Option<&'a opentelemetry::Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    fn event_names(span: &Finished) -> Vec<&str> {
        span.events.iter().map(|e| e.name.as_ref()).collect()
    }

    #[test]
    fn a_root_context_joins_the_callers_trace_or_starts_one() {
        let tracer = Tracer::global(1.0);
        let (root, caller) = tracer.root(Some(CALLER));
        let tp = TraceParent::parse(&root).unwrap();
        assert_eq!(tp.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(tp.span_id, "00f067aa0ba902b7", "a span of its own");
        assert_eq!(caller.as_deref(), Some(CALLER));
        for caller in [None, Some("garbage")] {
            let (root, kept) = tracer.root(caller);
            let tp = TraceParent::parse(&root).unwrap();
            assert_ne!(tp.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(tp.flags, "01");
            assert_eq!(kept, None);
        }
    }

    #[test]
    fn attempts_replies_compensations_and_the_root_become_linked_spans() {
        let t0 = Utc::now();
        let (root, caller) = Tracer::global(1.0).root(Some(CALLER));
        let (def, mut saga, start) =
            crate::record::started_order("s1", "tok_decline", Some(&root), t0);
        saga.caller_traceparent = caller;
        let mut tracer = Tracer::global(1.0);
        tracer.decided(&def, None, &saga, &start.entry);
        assert!(tracer.pending.is_empty(), "a start ends no span");
        let root_id = SpanId::from_hex(TraceParent::parse(&root).unwrap().span_id).unwrap();

        let t1 = t0 + chrono::Duration::milliseconds(10);
        let spans = step(
            &mut tracer,
            &def,
            &mut saga,
            reply("s1:reserve-stock:do:1", ok()),
            t1,
        );
        let [attempt, applied] = &spans[..] else {
            panic!("an attempt and its reply: {spans:#?}")
        };
        assert_eq!(attempt.name, "reserve-stock");
        assert_eq!(
            attempt.span_id,
            SpanId::from(protocol::span_id_of("s1:reserve-stock:do:1"))
        );
        assert_eq!(
            attempt.parent.as_ref().map(SpanContext::span_id),
            Some(root_id)
        );
        assert_eq!(
            (attempt.start, attempt.end),
            (t0, Some(t1)),
            "sent → reply applied"
        );
        assert_eq!(attempt.error, None);
        assert_eq!(attr(attempt, "saga.compensation"), Some(&false.into()));
        assert_eq!(event_names(attempt), ["command sent", "reply"]);
        assert_eq!(applied.name, "reply reserve-stock");
        assert_eq!(
            applied.parent.as_ref().map(SpanContext::span_id),
            Some(attempt.span_id)
        );
        assert_eq!((applied.start, applied.end), (t1, None), "ends when stored");

        // A retryable failure: the attempt ends with the retry scheduled.
        let t2 = t1 + chrono::Duration::milliseconds(10);
        let spans = step(
            &mut tracer,
            &def,
            &mut saga,
            reply("s1:take-payment:do:1", failed(true)),
            t2,
        );
        assert_eq!(spans[0].name, "take-payment");
        assert_eq!((spans[0].start, spans[0].end), (t1, Some(t2)));
        assert_eq!(
            event_names(&spans[0]),
            ["command sent", "reply", "retry scheduled"]
        );
        assert!(spans[0].error.is_some());
        // The retry goes out: no span ends.
        let t3 = t2 + chrono::Duration::seconds(5);
        assert!(step(&mut tracer, &def, &mut saga, Input::Wake, t3).is_empty());
        // Its timeout ends attempt 2, whose span starts when it was sent.
        let t4 = t3 + chrono::Duration::seconds(60);
        let spans = step(&mut tracer, &def, &mut saga, Input::Wake, t4);
        assert_eq!(spans.len(), 1, "no reply span for a timeout: {spans:#?}");
        assert_eq!(
            spans[0].span_id,
            SpanId::from(protocol::span_id_of("s1:take-payment:do:2"))
        );
        assert_eq!((spans[0].start, spans[0].end), (t3, Some(t4)));
        assert!(event_names(&spans[0]).contains(&"timeout"));
        // Attempt 3 declines for good: the way back starts.
        let t5 = t4 + chrono::Duration::seconds(60);
        assert!(step(&mut tracer, &def, &mut saga, Input::Wake, t5).is_empty());
        let t6 = t5 + chrono::Duration::milliseconds(10);
        let spans = step(
            &mut tracer,
            &def,
            &mut saga,
            reply("s1:take-payment:do:3", failed(false)),
            t6,
        );
        assert_eq!(spans[0].name, "take-payment");
        assert_eq!(saga.phase(), Phase::Compensating);
        let command = saga
            .steps
            .iter()
            .find(|s| s.compensation_attempts > 0)
            .map(|s| format!("s1:{}:undo:1", s.name))
            .unwrap();

        // The compensation is marked, and the root ends with the saga, under the caller.
        let t7 = t6 + chrono::Duration::milliseconds(10);
        let spans = step(&mut tracer, &def, &mut saga, reply(&command, ok()), t7);
        let names: Vec<_> = spans.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names[..2],
            ["compensate reserve-stock", "reply reserve-stock"]
        );
        assert_eq!(attr(&spans[0], "saga.compensation"), Some(&true.into()));
        assert_eq!((spans[0].start, spans[0].end), (t6, Some(t7)));
        let root_span = spans.last().unwrap();
        assert_eq!(root_span.name, "saga order-creation");
        assert_eq!(root_span.span_id, root_id);
        assert_eq!(
            root_span.parent.as_ref().map(SpanContext::span_id),
            Some(SpanId::from_hex("00f067aa0ba902b7").unwrap())
        );
        assert_eq!((root_span.start, root_span.end), (t0, Some(t7)));
        assert_eq!(attr(root_span, "saga.outcome"), Some(&"compensated".into()));
        for span in &spans {
            assert_eq!(span.trace_id, root_span.trace_id);
        }
    }

    #[test]
    fn an_unsampled_saga_builds_no_span_and_its_commands_say_so() {
        let t0 = Utc::now();
        let never = Tracer::global(0.0);
        let (root, _) = never.root(None);
        assert!(root.ends_with("-00"), "{root}");
        assert!(
            never.root(Some(CALLER)).0.ends_with("-01"),
            "the caller's decision is kept"
        );
        let (def, mut saga, _) = crate::record::started_order("s5", "tok_ok", Some(&root), t0);
        let mut tracer = never;
        let before = saga.clone();
        let transition = saga
            .apply(&def, reply("s5:reserve-stock:do:1", ok()), t0)
            .unwrap();
        tracer.decided(&def, Some(&before), &saga, &transition.entry);
        assert!(tracer.pending.is_empty());
        assert!(protocol::command_traceparent(&root, "s5:take-payment:do:1").ends_with("-00"));
        // The decision is the SDK's ratio sampler's, by trace id.
        assert!(sampled(0.5, 0) && !sampled(0.5, u128::from(u64::MAX)) && !sampled(0.0, 0));
    }

    #[test]
    fn spans_wait_for_the_write_and_a_failed_write_drops_them() {
        let t0 = Utc::now();
        let (root, _) = Tracer::global(1.0).root(None);
        let (def, mut saga, _) = crate::record::started_order("s2", "tok_ok", Some(&root), t0);
        let mut tracer = Tracer::global(1.0);
        let before = saga.clone();
        let transition = saga
            .apply(&def, reply("s2:reserve-stock:do:1", ok()), t0)
            .unwrap();
        tracer.decided(&def, Some(&before), &saga, &transition.entry);
        tracer.written("s2", false, t0);
        assert!(
            tracer.pending.is_empty(),
            "dropped: the input is applied again"
        );
        tracer.decided(&def, Some(&before), &saga, &transition.entry);
        tracer.written("s2", true, t0);
        assert!(tracer.pending.is_empty(), "emitted");

        // A saga with no trace context leaves nothing pending.
        let (def, mut saga, _) = crate::record::started_order("s3", "tok_ok", None, t0);
        let before = saga.clone();
        let transition = saga
            .apply(&def, reply("s3:reserve-stock:do:1", ok()), t0)
            .unwrap();
        tracer.decided(&def, Some(&before), &saga, &transition.entry);
        assert!(tracer.pending.is_empty());
    }

    #[test]
    fn a_resent_command_adds_a_span_under_its_attempt() {
        let t0 = Utc::now();
        let (root, _) = Tracer::global(1.0).root(None);
        let (def, mut saga, _) = crate::record::started_order("s4", "tok_ok", Some(&root), t0);
        let mut tracer = Tracer::global(1.0);
        let before = saga.clone();
        let transition = saga.resent(&def, "s4:reserve-stock:do:1", t0).unwrap();
        tracer.decided(&def, Some(&before), &saga, &transition.entry);
        let spans = tracer.pending.remove("s4").unwrap();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].name, "resend reserve-stock");
        assert_eq!(
            spans[0].parent.as_ref().map(SpanContext::span_id),
            Some(SpanId::from(protocol::span_id_of("s4:reserve-stock:do:1")))
        );
    }
}
