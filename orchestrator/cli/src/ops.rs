//! The operator commands (`sagas`, `dead-letters`, `definitions`): clients of the
//! HTTP API, printing tables for people or the API's JSON for scripts (`--json`).
//!
//! Exit codes: 0 done; 1 any other refusal (400, 422); 3 not found; 4 the saga's
//! state does not allow it (409); 69 the server is unreachable or failing (5xx);
//! 77 no token, a wrong token or the wrong role (401, 403); 64 bad usage.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::Value;

/// Where the API is and who is calling.
#[derive(Debug, Args)]
pub(crate) struct Connection {
    /// The orchestrator's HTTP address.
    #[arg(
        long,
        visible_alias = "url",
        env = "JETSAGA_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    server: String,
    /// An API token (see [http] tokens in the server's config).
    #[arg(long, env = "JETSAGA_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

/// `jetsaga sagas ...`
#[derive(Debug, Subcommand)]
pub(crate) enum Sagas {
    /// List sagas, most recently updated first.
    List {
        /// Only this saga type.
        #[arg(long = "type")]
        saga_type: Option<String>,
        /// Only this state (running, compensating, completed, compensated, failed).
        #[arg(long)]
        state: Option<String>,
        /// Only stuck sagas (parked failed, or waiting twice their step's timeout).
        #[arg(long)]
        stuck: bool,
        /// Page size (1 to 500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue after a previous page (its next cursor).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one saga (by id, or by --key TYPE KEY) and its journal as a timeline.
    #[command(visible_alias = "get")]
    Show {
        /// The saga id.
        #[arg(required_unless_present = "key", conflicts_with = "key")]
        id: Option<String>,
        /// Find it by saga type and business key instead.
        #[arg(long, num_args = 2, value_names = ["TYPE", "KEY"])]
        key: Option<Vec<String>>,
    },
    /// A saga's journal.
    Journal {
        /// The saga id.
        id: String,
    },
    /// Retry a failed saga's compensation.
    Retry {
        /// The saga id.
        id: String,
    },
    /// Abort a running saga before its pivot: it compensates.
    Abort {
        /// The saga id.
        id: String,
        /// Why (journaled).
        #[arg(long)]
        reason: String,
    },
}

/// `jetsaga dead-letters ...`
#[derive(Debug, Subcommand)]
pub(crate) enum DeadLetters {
    /// List dead letters, oldest first.
    List {
        /// Only from this source (participant.inventory, orchestrator.replies, ...).
        #[arg(long)]
        source: Option<String>,
        /// Page size (1 to 500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue after a previous page (its next cursor).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Publish one again to its original subject, with its original headers.
    Redrive {
        /// The dead letter's id.
        id: u64,
    },
    /// Delete one.
    #[command(visible_alias = "delete")]
    Discard {
        /// The dead letter's id.
        id: u64,
    },
}

/// What an operator command asks for.
#[derive(Debug)]
pub(crate) enum Request {
    /// `sagas ...`
    Sagas(Sagas),
    /// `dead-letters ...`
    DeadLetters(DeadLetters),
    /// `definitions`
    Definitions,
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// A failed call, with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl Client {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base.trim_end_matches('/'));
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| {
            Failure::new(
                69,
                format!("cannot reach the orchestrator at {}: {e}", self.base),
            )
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| Failure::new(69, format!("the orchestrator's answer was cut: {e}")))?;
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status.is_success() {
            return Ok(value);
        }
        let message = match (
            value["error"]["code"].as_str(),
            value["error"]["message"].as_str(),
        ) {
            (Some(code), Some(message)) => match value["error"]["state"].as_str() {
                Some(state) => format!("{message} ({code}; the saga is {state})"),
                None => format!("{message} ({code})"),
            },
            _ => format!("HTTP {status}: {value}"),
        };
        let code = match status.as_u16() {
            401 | 403 => 77,
            404 => 3,
            409 => 4,
            500.. => 69,
            _ => 1,
        };
        Err(Failure::new(code, message))
    }
}

fn encode(part: &str) -> String {
    let mut out = String::new();
    for b in part.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// Runs an operator command; prints the result and returns the exit code.
pub(crate) fn run(connection: Connection, request: Request) -> ExitCode {
    let runtime = match jetsaga_runtime::workers::from_env() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jetsaga: {e}");
            return e.exit_code();
        }
    };
    let client = Client {
        http: reqwest::Client::new(),
        base: connection.server,
        token: connection.token.filter(|t| !t.is_empty()),
    };
    match runtime.block_on(execute(&client, request, connection.json)) {
        Ok(output) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("jetsaga: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn execute(client: &Client, request: Request, json: bool) -> Result<String, Failure> {
    use reqwest::Method;
    let show = |value: Value, table: fn(&Value) -> String| {
        if json {
            value.to_string()
        } else {
            table(&value)
        }
    };
    match request {
        Request::Sagas(Sagas::List {
            saga_type,
            state,
            stuck,
            limit,
            cursor,
        }) => {
            let path = format!(
                "/v1/sagas{}",
                query(&[
                    ("type", saga_type),
                    ("state", state),
                    ("stuck", stuck.then(|| "true".to_owned())),
                    ("limit", Some(limit.to_string())),
                    ("cursor", cursor),
                ])
            );
            Ok(show(
                client.call(Method::GET, &path, None).await?,
                saga_table,
            ))
        }
        Request::Sagas(Sagas::Show { id, key }) => {
            let path = match (id, key.as_deref()) {
                (Some(id), _) => format!("/v1/sagas/{}", encode(&id)),
                (None, Some([saga_type, key])) => {
                    format!("/v1/sagas/{}/keys/{}", encode(saga_type), encode(key))
                }
                _ => return Err(Failure::new(64, "give a saga id or --key TYPE KEY")),
            };
            let saga = client.call(Method::GET, &path, None).await?;
            let id = saga["saga_id"].as_str().unwrap_or_default().to_owned();
            let journal = client
                .call(
                    Method::GET,
                    &format!("/v1/sagas/{}/journal", encode(&id)),
                    None,
                )
                .await?;
            if json {
                Ok(serde_json::json!({"saga": saga, "journal": journal["entries"]}).to_string())
            } else {
                Ok(format!("{}\n\n{}", saga_details(&saga), timeline(&journal)))
            }
        }
        Request::Sagas(Sagas::Journal { id }) => {
            let path = format!("/v1/sagas/{}/journal", encode(&id));
            Ok(show(client.call(Method::GET, &path, None).await?, timeline))
        }
        Request::Sagas(Sagas::Retry { id }) => {
            let path = format!("/v1/sagas/{}/retry", encode(&id));
            Ok(show(client.call(Method::POST, &path, None).await?, action))
        }
        Request::Sagas(Sagas::Abort { id, reason }) => {
            let path = format!("/v1/sagas/{}/abort", encode(&id));
            let body = serde_json::json!({ "reason": reason });
            Ok(show(
                client.call(Method::POST, &path, Some(body)).await?,
                action,
            ))
        }
        Request::DeadLetters(DeadLetters::List {
            source,
            limit,
            cursor,
        }) => {
            let path = format!(
                "/v1/dead-letters{}",
                query(&[
                    ("source", source),
                    ("limit", Some(limit.to_string())),
                    ("cursor", cursor)
                ])
            );
            Ok(show(
                client.call(Method::GET, &path, None).await?,
                dead_letter_table,
            ))
        }
        Request::DeadLetters(DeadLetters::Redrive { id }) => {
            let value = client
                .call(
                    Method::POST,
                    &format!("/v1/dead-letters/{id}/redrive"),
                    None,
                )
                .await?;
            Ok(show(value, |v| {
                format!(
                    "dead letter {} redriven to {}",
                    v["id"],
                    text(&v["subject"])
                )
            }))
        }
        Request::DeadLetters(DeadLetters::Discard { id }) => {
            client
                .call(Method::DELETE, &format!("/v1/dead-letters/{id}"), None)
                .await?;
            Ok(if json {
                serde_json::json!({"id": id, "deleted": true}).to_string()
            } else {
                format!("dead letter {id} deleted")
            })
        }
        Request::Definitions => Ok(show(
            client.call(Method::GET, "/v1/definitions", None).await?,
            definitions_table,
        )),
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A table with aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(header.iter().map(|h| (*h).to_owned()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
}

fn items(value: &Value) -> &[Value] {
    value["items"].as_array().map_or(&[], Vec::as_slice)
}

fn with_cursor(out: String, value: &Value) -> String {
    match value["next_cursor"].as_str() {
        Some(c) => format!("{out}\n(more: --cursor {c})"),
        None => out,
    }
}

fn saga_table(value: &Value) -> String {
    let rows: Vec<Vec<String>> = items(value)
        .iter()
        .map(|s| {
            vec![
                text(&s["saga_id"]),
                text(&s["saga_type"]),
                text(&s["key"]),
                format!(
                    "{}{}",
                    text(&s["state"]),
                    if s["stuck"] == true { " (stuck)" } else { "" }
                ),
                text(&s["current_step"]),
                text(&s["updated_at"]),
            ]
        })
        .collect();
    with_cursor(
        table(&["ID", "TYPE", "KEY", "STATE", "STEP", "UPDATED"], &rows),
        value,
    )
}

fn saga_details(saga: &Value) -> String {
    let mut out = vec![
        format!("saga     {}", text(&saga["saga_id"])),
        format!("type     {} v{}", text(&saga["saga_type"]), saga["version"]),
        format!("key      {}", text(&saga["key"])),
        format!("state    {}", text(&saga["state"])),
        format!(
            "step     {} (attempt {})",
            text(&saga["current_step"]),
            text(&saga["attempt"])
        ),
        format!("created  {}", text(&saga["created_at"])),
        format!("updated  {}", text(&saga["updated_at"])),
        format!("deadline {}", text(&saga["deadline_at"])),
        format!("trace    {}", text(&saga["trace_id"])),
    ];
    for (label, field) in [("cause", "cause"), ("error", "error")] {
        if saga[field].is_object() {
            out.push(format!(
                "{label:<8} {}: {}",
                text(&saga[field]["code"]),
                text(&saga[field]["message"])
            ));
        }
    }
    let steps: Vec<Vec<String>> = saga["steps"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|s| {
            vec![
                text(&s["name"]),
                text(&s["status"]),
                format!("{}/{}", s["attempts"], s["compensation_attempts"]),
                s["error"]["code"].as_str().unwrap_or("-").to_owned(),
                text(&s["finished_at"]),
            ]
        })
        .collect();
    out.push(String::new());
    out.push(table(
        &["STEP", "STATUS", "ATTEMPTS/COMP", "ERROR", "FINISHED"],
        &steps,
    ));
    out.join("\n")
}

fn timeline(journal: &Value) -> String {
    let rows: Vec<Vec<String>> = journal["entries"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|e| {
            let actor = match e["operator"].as_str() {
                Some(name) => format!("operator {name}"),
                None => text(&e["actor"]),
            };
            vec![
                text(&e["seq"]),
                text(&e["at"]),
                text(&e["cause"]),
                format!("{} -> {}", text(&e["from"]), text(&e["to"])),
                text(&e["step"]),
                actor,
                text(&e["error"]),
            ]
        })
        .collect();
    table(&["#", "AT", "WHAT", "STATE", "STEP", "BY", "ERROR"], &rows)
}

fn action(value: &Value) -> String {
    format!(
        "saga {} is now {}",
        text(&value["saga_id"]),
        text(&value["state"])
    )
}

fn dead_letter_table(value: &Value) -> String {
    let rows: Vec<Vec<String>> = items(value)
        .iter()
        .map(|d| {
            vec![
                text(&d["id"]),
                text(&d["source"]),
                text(&d["subject"]),
                text(&d["at"]),
                text(&d["reason"]),
            ]
        })
        .collect();
    with_cursor(
        table(&["ID", "SOURCE", "SUBJECT", "AT", "REASON"], &rows),
        value,
    )
}

fn definitions_table(value: &Value) -> String {
    let rows: Vec<Vec<String>> = value["definitions"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|d| {
            let steps: Vec<String> = d["steps"]
                .as_array()
                .map_or(&[][..], Vec::as_slice)
                .iter()
                .map(|s| format!("{} ({})", text(&s["name"]), text(&s["kind"])))
                .collect();
            vec![text(&d["name"]), text(&d["version"]), steps.join(", ")]
        })
        .collect();
    table(&["TYPE", "VERSION", "STEPS"], &rows)
}
