//! Saga definitions: the data file format, its validation and the typed model.
//!
//! A definition is a TOML file. Parsing rejects unknown fields; [`Definition::parse`]
//! then checks the rules a runnable saga needs and reports every problem it finds,
//! each naming the file, the step and what is wrong.
//!
//! A definition may carry a JSON Schema for its start input (`input-schema`) and for
//! each step's result (`result-schema`), inline as a TOML table or as the name of a
//! JSON file beside the definition. This crate reads no files: [`Definition::parse_with`]
//! takes a function that returns a named file's text (the orchestrator reads it from
//! the definition's directory; a built-in definition uses `include_str!`).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::schema::{Invalid, Schema, Violation};

/// One problem found in a definition file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {}{problem}", step.as_ref().map(|s| format!("step \"{s}\": ")).unwrap_or_default())]
pub struct Error {
    /// The file (or other source name) the definition came from.
    pub file: String,
    /// The step the problem is in, when it is in one.
    pub step: Option<String>,
    /// What is wrong, in a short lowercase sentence.
    pub problem: String,
}

/// What a step is, relative to the saga's point of no return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    /// Undone by its compensation when a later step (up to the pivot) fails.
    Compensatable,
    /// The point of no return: once it succeeds the saga can only go forward.
    Pivot,
    /// After the pivot: retried until it succeeds, never compensated.
    Retriable,
}

/// How a command is retried after a retryable failure or a timeout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included. `None` means until it succeeds
    /// (only allowed, and implied, for retriable steps).
    pub max_attempts: Option<u32>,
    /// Wait before the second attempt.
    pub initial_backoff: Duration,
    /// Upper bound of any wait.
    pub max_backoff: Duration,
    /// Factor between consecutive waits.
    pub multiplier: f64,
    /// Share of each wait that is randomised, from 0 to 1.
    pub jitter: f64,
}

impl RetryPolicy {
    /// Whether attempt number `attempt` (1-based) may be followed by another one.
    pub fn allows_another(&self, attempt: u32) -> bool {
        self.max_attempts.is_none_or(|max| attempt < max)
    }

    /// The wait after attempt number `attempt` failed. `spread` in `[0, 1)` picks the
    /// point within the jitter band; the caller derives it so that replays agree.
    pub fn backoff(&self, attempt: u32, spread: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = base.min(self.max_backoff.as_secs_f64());
        let jittered = capped * (1.0 - self.jitter * spread.clamp(0.0, 1.0));
        Duration::from_secs_f64(jittered.max(0.0))
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: Some(3),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

/// One step of a saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Unique within the saga; a NATS subject token.
    pub name: String,
    /// The participant that runs it: commands go to `saga.cmd.<participant>.<action>`.
    pub participant: String,
    /// The forward action.
    pub action: String,
    /// The action that undoes it, for compensatable steps (and optionally the pivot).
    pub compensation: Option<String>,
    /// Where the step stands relative to the pivot.
    pub kind: StepKind,
    /// How long one attempt may wait for its reply.
    pub timeout: Duration,
    /// How the forward action is retried.
    pub retry: RetryPolicy,
    /// What a successful forward result must look like; `None`: anything.
    pub result_schema: Option<Schema>,
}

/// Domain events published when a saga finishes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Events {
    /// Published on `saga.event.<name>` when every step succeeded.
    pub completed: Vec<String>,
    /// Published on `saga.event.<name>` when the saga was compensated.
    pub compensated: Vec<String>,
}

/// A validated saga definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Definition {
    /// The saga type, a NATS subject token (`saga.start.<name>`).
    pub name: String,
    /// Running sagas keep the version they started with.
    pub version: u32,
    /// Free text for operators.
    pub description: String,
    /// What the start input must look like; `None`: any JSON object.
    pub input_schema: Option<Schema>,
    /// From start; past it a saga that has not passed its pivot is compensated.
    pub deadline: Duration,
    /// Domain events to publish at the end.
    pub events: Events,
    /// How compensations are retried before the saga is parked as failed.
    pub compensation_retry: RetryPolicy,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

impl Definition {
    /// Parses and validates a definition. `file` names the source in errors.
    ///
    /// ```
    /// let text = r#"
    /// name = "greet"
    /// version = 1
    /// deadline = "1m"
    /// input-schema = { type = "object", required = ["name"] }
    /// [[steps]]
    /// name = "say-hello"
    /// participant = "greeter"
    /// action = "hello"
    /// kind = "pivot"
    /// timeout = "5s"
    /// "#;
    /// let def = jetsaga_sagas::Definition::parse("greet.toml", text).unwrap();
    /// assert_eq!(def.steps.len(), 1);
    /// assert!(def.check_input(&serde_json::json!({"name": "Ana"})).is_ok());
    /// ```
    ///
    /// A schema given as a file name is an error here; use [`Definition::parse_with`].
    pub fn parse(file: &str, text: &str) -> Result<Self, Vec<Error>> {
        Self::parse_with(file, text, |name| {
            Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!("no schema files can be read here (asked for \"{name}\")"),
            ))
        })
    }

    /// As [`Definition::parse`], with `read` returning the text of a schema file
    /// that the definition names (relative to the definition file).
    ///
    /// ```
    /// let text = include_str!("../definitions/order-creation.toml");
    /// let schema = include_str!("../definitions/order-creation.input.schema.json");
    /// let def = jetsaga_sagas::Definition::parse_with("order-creation.toml", text, |name| {
    ///     match name {
    ///         "order-creation.input.schema.json" => Ok(schema.to_owned()),
    ///         other => Err(std::io::Error::new(std::io::ErrorKind::NotFound, other.to_owned())),
    ///     }
    /// })
    /// .unwrap();
    /// let bad = serde_json::json!({"customer_id": "c-1"});
    /// let invalid = def.check_input(&bad).unwrap_err();
    /// assert!(invalid.violations.iter().any(|v| v.reason.contains("\"email\" is a required property")));
    /// ```
    pub fn parse_with(
        file: &str,
        text: &str,
        read: impl FnMut(&str) -> std::io::Result<String>,
    ) -> Result<Self, Vec<Error>> {
        let raw: raw::Definition = toml::from_str(text).map_err(|e| {
            vec![Error {
                file: file.to_owned(),
                step: None,
                problem: e.to_string().trim().replace('\n', " "),
            }]
        })?;
        raw.validate(file, read)
    }

    /// Checks a start input against the definition's input schema (without one,
    /// the input must be a JSON object), naming every violation.
    pub fn check_input(&self, input: &serde_json::Value) -> Result<(), Invalid> {
        match &self.input_schema {
            Some(schema) => schema.check(input),
            None if input.is_object() => Ok(()),
            None => Err(Invalid {
                violations: vec![Violation {
                    path: String::new(),
                    reason: format!("{input} is not of type \"object\""),
                }],
            }),
        }
    }

    /// The index of the pivot step, if the saga has one.
    pub fn pivot(&self) -> Option<usize> {
        self.steps.iter().position(|s| s.kind == StepKind::Pivot)
    }

    /// The step with this name.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }
}

/// Whether `token` can stand as one NATS subject token: not empty, no dots,
/// whitespace or wildcards.
pub fn is_subject_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, '.' | '*' | '>'))
}

/// Whether `name` is one or more subject tokens joined by dots (event names).
pub fn is_dotted_name(name: &str) -> bool {
    name.split('.').all(is_subject_token)
}

/// Parses `250ms`, `10s`, `5m`, `1h` or a combination such as `1m30s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".to_owned());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("invalid duration \"{text}\": expected a number"));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration \"{text}\": number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.saturating_mul(60)),
            "h" => Duration::from_secs(value.saturating_mul(3600)),
            "" => {
                return Err(format!(
                    "invalid duration \"{text}\": missing unit (ms, s, m, h)"
                ));
            }
            other => {
                return Err(format!(
                    "invalid duration \"{text}\": unknown unit \"{other}\""
                ));
            }
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The file format as written, before validation.
mod raw {
    use std::collections::HashSet;
    use std::time::Duration;

    use serde::Deserialize;

    use super::{Error, StepKind, is_dotted_name, is_subject_token};
    use crate::schema::Schema;

    /// A schema as written: the name of a JSON file beside the definition, or inline.
    #[derive(Debug, Deserialize)]
    #[serde(untagged)]
    enum SchemaSource {
        File(String),
        Inline(serde_json::Value),
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    pub(super) struct Definition {
        name: String,
        version: u32,
        #[serde(default)]
        description: String,
        #[serde(default)]
        input_schema: Option<SchemaSource>,
        deadline: String,
        #[serde(default)]
        events: Events,
        #[serde(default)]
        compensation_retry: Option<Retry>,
        #[serde(default)]
        steps: Vec<Step>,
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Events {
        #[serde(default)]
        completed: Vec<String>,
        #[serde(default)]
        compensated: Vec<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Step {
        name: String,
        participant: String,
        action: String,
        #[serde(default)]
        compensation: Option<String>,
        kind: StepKind,
        timeout: String,
        #[serde(default)]
        retry: Option<Retry>,
        #[serde(default)]
        result_schema: Option<SchemaSource>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Retry {
        max_attempts: Option<u32>,
        initial_backoff: Option<String>,
        max_backoff: Option<String>,
        multiplier: Option<f64>,
        jitter: Option<f64>,
    }

    /// Collects problems so that one run reports all of them.
    struct Problems<'a, R> {
        file: &'a str,
        found: Vec<Error>,
        read: R,
    }

    impl<R: FnMut(&str) -> std::io::Result<String>> Problems<'_, R> {
        fn add(&mut self, step: Option<&str>, problem: impl Into<String>) {
            self.found.push(Error {
                file: self.file.to_owned(),
                step: step.map(str::to_owned),
                problem: problem.into(),
            });
        }

        fn duration(&mut self, step: Option<&str>, field: &str, text: &str) -> Duration {
            match super::parse_duration(text) {
                Ok(d) if d.is_zero() => {
                    self.add(step, format!("{field} must be greater than zero"));
                    d
                }
                Ok(d) => d,
                Err(e) => {
                    self.add(step, format!("{field}: {e}"));
                    Duration::ZERO
                }
            }
        }

        /// Reads (if it names a file), parses and compiles a schema.
        fn schema(
            &mut self,
            step: Option<&str>,
            field: &str,
            source: Option<&SchemaSource>,
        ) -> Option<Schema> {
            let (what, value) = match source? {
                SchemaSource::Inline(value) => (field.to_owned(), value.clone()),
                SchemaSource::File(name) => {
                    let what = format!("{field} \"{name}\"");
                    let text = match (self.read)(name) {
                        Ok(text) => text,
                        Err(e) => {
                            self.add(step, format!("{what}: cannot read: {e}"));
                            return None;
                        }
                    };
                    match serde_json::from_str(&text) {
                        Ok(value) => (what, value),
                        Err(e) => {
                            self.add(step, format!("{what}: not JSON: {e}"));
                            return None;
                        }
                    }
                }
            };
            match Schema::compile(value) {
                Ok(schema) => Some(schema),
                Err(broken) => {
                    self.add(step, format!("{what}: {broken}"));
                    None
                }
            }
        }

        fn token(&mut self, step: Option<&str>, field: &str, value: &str) {
            if !is_subject_token(value) {
                self.add(
                    step,
                    format!(
                        "{field} \"{value}\" is not a valid NATS subject token \
                         (no dots, spaces, '*' or '>', not empty)"
                    ),
                );
            }
        }

        fn retry(
            &mut self,
            step: Option<&str>,
            raw: Option<&Retry>,
            until_success: bool,
        ) -> super::RetryPolicy {
            let mut policy = super::RetryPolicy::default();
            if until_success {
                policy.max_attempts = None;
            }
            let Some(raw) = raw else { return policy };
            if let Some(max) = raw.max_attempts {
                if until_success {
                    self.add(
                        step,
                        "retry.max-attempts is not allowed on a retriable step: it retries until it succeeds",
                    );
                } else if max == 0 {
                    self.add(step, "retry.max-attempts must be at least 1");
                } else {
                    policy.max_attempts = Some(max);
                }
            }
            if let Some(text) = &raw.initial_backoff {
                policy.initial_backoff = self.duration(step, "retry.initial-backoff", text);
            }
            if let Some(text) = &raw.max_backoff {
                policy.max_backoff = self.duration(step, "retry.max-backoff", text);
            }
            if policy.max_backoff < policy.initial_backoff {
                self.add(
                    step,
                    "retry.max-backoff is smaller than retry.initial-backoff",
                );
            }
            if let Some(m) = raw.multiplier {
                if !(m.is_finite() && m >= 1.0) {
                    self.add(
                        step,
                        format!("retry.multiplier must be at least 1, got {m}"),
                    );
                }
                policy.multiplier = m;
            }
            if let Some(j) = raw.jitter {
                if !(0.0..=1.0).contains(&j) {
                    self.add(
                        step,
                        format!("retry.jitter must be between 0 and 1, got {j}"),
                    );
                }
                policy.jitter = j;
            }
            policy
        }
    }

    impl Definition {
        pub(super) fn validate(
            self,
            file: &str,
            read: impl FnMut(&str) -> std::io::Result<String>,
        ) -> Result<super::Definition, Vec<Error>> {
            let mut p = Problems {
                file,
                found: Vec::new(),
                read,
            };
            let input_schema = p.schema(None, "input-schema", self.input_schema.as_ref());
            p.token(None, "name", &self.name);
            if self.version == 0 {
                p.add(None, "version must be at least 1");
            }
            let deadline = p.duration(None, "deadline", &self.deadline);
            for event in self.events.completed.iter().chain(&self.events.compensated) {
                if !is_dotted_name(event) {
                    p.add(
                        None,
                        format!(
                            "event \"{event}\" is not a valid subject (dot-separated tokens, \
                             no spaces or wildcards)"
                        ),
                    );
                }
            }
            let compensation_retry = p.retry(None, self.compensation_retry.as_ref(), false);
            if self.steps.is_empty() {
                p.add(None, "the saga has no steps");
            }

            let mut names = HashSet::new();
            let pivot = self.steps.iter().position(|s| s.kind == StepKind::Pivot);
            let mut steps = Vec::with_capacity(self.steps.len());
            let mut pivots = 0;
            for (index, raw) in self.steps.iter().enumerate() {
                let step = Some(raw.name.as_str());
                p.token(step, "name", &raw.name);
                if raw.name.contains(':') {
                    p.add(
                        step,
                        format!(
                            "name \"{}\" contains ':', which separates the parts of a command id",
                            raw.name
                        ),
                    );
                }
                if !names.insert(raw.name.as_str()) {
                    p.add(step, "duplicate step name");
                }
                p.token(step, "participant", &raw.participant);
                p.token(step, "action", &raw.action);
                if let Some(c) = &raw.compensation {
                    p.token(step, "compensation", c);
                }
                match raw.kind {
                    StepKind::Compensatable => {
                        if raw.compensation.is_none() {
                            p.add(step, "a compensatable step needs a compensation");
                        }
                        if pivot.is_some_and(|pv| index > pv) {
                            p.add(
                                step,
                                "a compensatable step after the pivot can never be compensated",
                            );
                        }
                    }
                    StepKind::Pivot => {
                        pivots += 1;
                        if pivots == 2 {
                            p.add(step, "more than one pivot");
                        }
                    }
                    StepKind::Retriable => {
                        if raw.compensation.is_some() {
                            p.add(
                                step,
                                "a step after the pivot cannot have a compensation (it is retried until it succeeds)",
                            );
                        }
                        if pivot.is_none_or(|pv| index < pv) {
                            p.add(step, "a retriable step must come after the pivot");
                        }
                    }
                }
                let timeout = p.duration(step, "timeout", &raw.timeout);
                let retry = p.retry(step, raw.retry.as_ref(), raw.kind == StepKind::Retriable);
                let result_schema = p.schema(step, "result-schema", raw.result_schema.as_ref());
                steps.push(super::Step {
                    name: raw.name.clone(),
                    participant: raw.participant.clone(),
                    action: raw.action.clone(),
                    compensation: raw.compensation.clone(),
                    kind: raw.kind,
                    timeout,
                    retry,
                    result_schema,
                });
            }
            if !p.found.is_empty() {
                return Err(p.found);
            }
            Ok(super::Definition {
                name: self.name,
                version: self.version,
                description: self.description,
                input_schema,
                deadline,
                events: super::Events {
                    completed: self.events.completed,
                    compensated: self.events.compensated,
                },
                compensation_retry,
                steps,
            })
        }
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Compensatable => "compensatable",
            Self::Pivot => "pivot",
            Self::Retriable => "retriable",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: &str = include_str!("../definitions/order-creation.toml");
    const ORDER_SCHEMA: &str = include_str!("../definitions/order-creation.input.schema.json");

    fn order() -> Definition {
        Definition::parse_with("order-creation.toml", ORDER, |name| {
            assert_eq!(name, "order-creation.input.schema.json");
            Ok(ORDER_SCHEMA.to_owned())
        })
        .unwrap()
    }

    fn problems(text: &str) -> Vec<String> {
        match Definition::parse("bad.toml", text) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    fn with_steps(steps: &str) -> String {
        format!("name = \"s\"\nversion = 1\ndeadline = \"1m\"\n{steps}")
    }

    const STEP_A: &str = "[[steps]]\nname = \"a\"\nparticipant = \"p\"\naction = \"do\"\ncompensation = \"undo\"\nkind = \"compensatable\"\ntimeout = \"1s\"\n";
    const PIVOT: &str = "[[steps]]\nname = \"b\"\nparticipant = \"p\"\naction = \"go\"\nkind = \"pivot\"\ntimeout = \"1s\"\n";
    const AFTER: &str = "[[steps]]\nname = \"c\"\nparticipant = \"p\"\naction = \"fin\"\nkind = \"retriable\"\ntimeout = \"1s\"\n";

    #[test]
    fn shipped_order_definition_is_valid() {
        let def = order();
        assert_eq!(def.name, "order-creation");
        assert!(def.input_schema.is_some());
        assert_eq!(def.pivot(), Some(1));
        assert_eq!(def.steps[0].compensation.as_deref(), Some("release"));
        assert_eq!(def.steps[2].retry.max_attempts, None);
        assert_eq!(def.events.completed, ["order.confirmed"]);
        assert_eq!(def.events.compensated, ["order.cancelled"]);
        assert_eq!(def.deadline, Duration::from_secs(300));
    }

    #[test]
    fn every_invalid_case_is_named() {
        let cases: Vec<(String, &str)> = vec![
            (
                format!("{}oops = 1\n", with_steps(STEP_A)),
                "unknown field `oops`",
            ),
            (
                with_steps(&format!("{STEP_A}{STEP_A}")),
                "step \"a\": duplicate step name",
            ),
            (
                with_steps(&STEP_A.replace("name = \"a\"", "name = \"a:\"")),
                "name \"a:\" contains ':', which separates the parts of a command id",
            ),
            (
                with_steps(&STEP_A.replace("compensation = \"undo\"\n", "")),
                "step \"a\": a compensatable step needs a compensation",
            ),
            (
                with_steps(&format!(
                    "{PIVOT}{}",
                    AFTER.replace("kind", "compensation = \"x\"\nkind")
                )),
                "step \"c\": a step after the pivot cannot have a compensation",
            ),
            (
                with_steps(&format!("{PIVOT}{}", PIVOT.replace("\"b\"", "\"b2\""))),
                "step \"b2\": more than one pivot",
            ),
            (
                with_steps(&format!("{AFTER}{PIVOT}")),
                "step \"c\": a retriable step must come after the pivot",
            ),
            (
                with_steps(AFTER),
                "step \"c\": a retriable step must come after the pivot",
            ),
            (
                with_steps(&STEP_A.replace("\"1s\"", "\"0s\"")),
                "step \"a\": timeout must be greater than zero",
            ),
            (
                with_steps(&STEP_A.replace("\"do\"", "\"do.it\"")),
                "step \"a\": action \"do.it\" is not a valid NATS subject token",
            ),
            (
                with_steps(&STEP_A.replace("\"p\"", "\"my participant\"")),
                "participant \"my participant\" is not a valid NATS subject token",
            ),
            (
                with_steps(&STEP_A.replace("\"a\"", "\"a*\"")),
                "name \"a*\" is not a valid",
            ),
            (
                with_steps(&STEP_A.replace("\"undo\"", "\"un>\"")),
                "compensation \"un>\" is not a valid",
            ),
            (with_steps(""), "bad.toml: the saga has no steps"),
            (
                with_steps(&format!(
                    "{PIVOT}{}",
                    AFTER.replace("timeout", "retry = { max-attempts = 3 }\ntimeout")
                )),
                "retry.max-attempts is not allowed on a retriable step",
            ),
            (
                with_steps(&STEP_A.replace("\"1s\"", "\"1 fortnight\"")),
                "timeout: invalid duration",
            ),
            (
                format!(
                    "{}[events]\ncompleted = [\"order confirmed\"]\n",
                    with_steps(STEP_A)
                ),
                "event \"order confirmed\" is not a valid subject",
            ),
            (
                with_steps(&STEP_A.replace("[[steps]]", "[[steps]]\nretries = 3")),
                "unknown field `retries`",
            ),
        ];
        for (text, expected) in cases {
            let found = problems(&text);
            assert!(
                found
                    .iter()
                    .any(|p| p.contains(expected) && p.starts_with("bad.toml")),
                "expected a problem containing {expected:?}, got {found:?}\nfor:\n{text}"
            );
        }
    }

    #[test]
    fn reports_all_problems_at_once() {
        let text = with_steps(&format!(
            "{}{}",
            STEP_A.replace("\"1s\"", "\"0s\""),
            STEP_A.replace("compensation = \"undo\"\n", "")
        ));
        assert_eq!(problems(&text).len(), 3, "{:?}", problems(&text));
    }

    #[test]
    fn durations_and_backoff() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3 days").is_err());
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");

        let policy = RetryPolicy {
            max_attempts: Some(4),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            multiplier: 2.0,
            jitter: 0.5,
        };
        assert_eq!(policy.backoff(1, 0.0), Duration::from_millis(100));
        assert_eq!(policy.backoff(2, 0.0), Duration::from_millis(200));
        assert_eq!(policy.backoff(3, 0.0), Duration::from_millis(300));
        assert_eq!(policy.backoff(9, 0.0), Duration::from_millis(300));
        assert_eq!(policy.backoff(1, 1.0), Duration::from_millis(50));
        assert!(policy.allows_another(3));
        assert!(!policy.allows_another(4));
    }

    #[test]
    fn the_order_schema_keeps_the_order_rules_and_names_each_problem() {
        let def = order();
        let good = serde_json::json!({"customer_id": "c-42", "email": "ana@example.com",
            "items": [{"sku": "sku-1", "quantity": 2}], "amount_cents": 4999,
            "currency": "EUR", "card_token": "tok_ok"});
        assert_eq!(def.check_input(&good), Ok(()));

        let many: Vec<_> = (0..101)
            .map(|i| serde_json::json!({"sku": format!("s{i}"), "quantity": 1}))
            .collect();
        let cases = [
            ("email", serde_json::json!("nope"), "/email"),
            ("email", serde_json::json!("a b@c.de"), "/email"),
            ("email", serde_json::json!("@c.de"), "/email"),
            ("email", serde_json::json!("ana@example"), "/email"),
            ("customer_id", serde_json::json!("  "), "/customer_id"),
            ("items", serde_json::json!([]), "/items"),
            ("items", serde_json::Value::Array(many), "/items"),
            (
                "items",
                serde_json::json!([{"sku": "x", "quantity": 0}]),
                "/items/0/quantity",
            ),
            (
                "items",
                serde_json::json!([{"sku": " ", "quantity": 1}]),
                "/items/0/sku",
            ),
            ("items", serde_json::json!([{"sku": "x"}]), "/items/0"),
            ("amount_cents", serde_json::json!(0), "/amount_cents"),
            ("amount_cents", serde_json::json!(-5), "/amount_cents"),
            ("amount_cents", serde_json::json!(1.5), "/amount_cents"),
            ("currency", serde_json::json!("euro"), "/currency"),
            ("currency", serde_json::json!("EURO"), "/currency"),
            ("card_token", serde_json::json!(""), "/card_token"),
            ("extra", serde_json::json!(1), ""),
        ];
        for (field, value, path) in cases {
            let mut bad = good.clone();
            bad[field] = value;
            let err = def.check_input(&bad).unwrap_err();
            assert_eq!(err.violations.len(), 1, "{field}: {err}");
            assert_eq!(err.violations[0].path, path, "{field}: {err}");
        }
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("email");
        let err = def.check_input(&missing).unwrap_err();
        assert!(
            err.to_string().contains("\"email\" is a required property"),
            "{err}"
        );

        // Every violation at once.
        let mut worse = good;
        worse["currency"] = serde_json::json!("eur");
        worse["items"] =
            serde_json::json!([{"sku": "a", "quantity": 1}, {"sku": "b", "quantity": 0}]);
        worse.as_object_mut().unwrap().remove("card_token");
        let err = def.check_input(&worse).unwrap_err();
        let paths: Vec<&str> = err.violations.iter().map(|v| v.path.as_str()).collect();
        assert_eq!(paths.len(), 3, "{err}");
        for path in ["/currency", "/items/1/quantity", ""] {
            assert!(paths.contains(&path), "{path} missing in {err}");
        }
    }

    #[test]
    fn schemas_inline_in_files_or_broken() {
        // Without a schema any object is accepted.
        let plain = Definition::parse("s.toml", &with_steps(STEP_A)).unwrap();
        assert!(plain.check_input(&serde_json::json!({"a": 1})).is_ok());
        let err = plain.check_input(&serde_json::json!([1])).unwrap_err();
        assert_eq!(err.violations[0].path, "");

        // Inline, for the input and a step's result.
        let inline = with_steps(&STEP_A.replace(
            "timeout",
            "result-schema = { type = \"object\", required = [\"id\"] }\ntimeout",
        ))
        .replace(
            "deadline = \"1m\"\n",
            "deadline = \"1m\"\n[input-schema]\ntype = \"object\"\nrequired = [\"n\"]\nproperties.n = { type = \"integer\" }\n",
        );
        let def = Definition::parse("s.toml", &inline).unwrap();
        assert!(def.check_input(&serde_json::json!({"n": 1})).is_ok());
        let err = def.check_input(&serde_json::json!({"n": "x"})).unwrap_err();
        assert_eq!(err.violations[0].path, "/n");
        let result = def.steps[0].result_schema.as_ref().unwrap();
        assert!(result.check(&serde_json::json!({"id": 1})).is_ok());
        assert!(result.check(&serde_json::json!({})).is_err());

        // A file beside the definition, read through the caller's function.
        let by_file = with_steps(STEP_A).replace(
            "deadline = \"1m\"\n",
            "deadline = \"1m\"\ninput-schema = \"in.json\"\n",
        );
        let def = Definition::parse_with("s.toml", &by_file, |name| {
            assert_eq!(name, "in.json");
            Ok(r#"{"type": "object", "required": ["n"]}"#.to_owned())
        })
        .unwrap();
        assert!(def.check_input(&serde_json::json!({})).is_err());
        // `parse` reads no files.
        let found = problems(&by_file.replace("bad.toml", ""));
        assert!(
            found[0].contains("input-schema \"in.json\": cannot read"),
            "{found:?}"
        );

        let broken =
            |schema: &'static str| match Definition::parse_with("bad.toml", &by_file, |_| {
                Ok(schema.to_owned())
            }) {
                Ok(_) => panic!("{schema} should be refused"),
                Err(errors) => errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            };
        let found = broken(r#"{"type": "object", "properties": {"n": {"type": "integr"}}}"#);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with(
                "bad.toml: input-schema \"in.json\": not a valid JSON Schema at /properties/n/type"
            ),
            "{found:?}"
        );
        let found = broken("{\"type\": ");
        assert!(
            found[0].contains("input-schema \"in.json\": not JSON"),
            "{found:?}"
        );
        let found = problems(&with_steps(
            &STEP_A.replace("timeout", "result-schema = { minimum = \"one\" }\ntimeout"),
        ));
        assert!(
            found[0].starts_with("bad.toml: step \"a\": result-schema: not a valid JSON Schema"),
            "{found:?}"
        );
    }
}
