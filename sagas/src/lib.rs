//! The saga model of jetsaga, with no I/O: what the orchestrator runs and what
//! travels on the wire.
//!
//! - [`definition`]: the definition file format (TOML), its validation and the typed model.
//! - [`saga`]: the pure state machine: [`Saga::start`] and [`Saga::apply`] return
//!   the side effects as [`Action`]s; time is passed in.
//! - [`protocol`]: subjects, headers and JSON bodies of commands, replies, starts and events.
//! - [`schema`]: JSON Schemas for a saga's input and its steps' results.
//! - [`streams`]: the JetStream streams jetsaga uses, as plain data.
//!
//! ```
//! use jetsaga_sagas::{Definition, Input, Saga, protocol::Outcome};
//!
//! let schema = include_str!("../definitions/order-creation.input.schema.json");
//! let def = Definition::parse_with(
//!     "order-creation.toml",
//!     include_str!("../definitions/order-creation.toml"),
//!     |_| Ok(schema.to_owned()),
//! )
//! .unwrap();
//! let input = serde_json::json!({"customer_id": "c-42", "email": "ana@example.com",
//!     "items": [{"sku": "sku-1", "quantity": 2}], "amount_cents": 4999, "currency": "EUR",
//!     "card_token": "tok_ok"});
//! let now = chrono::Utc::now();
//! let (mut saga, start) = Saga::start(&def, "s-1".into(), "key-1".into(), input, None, now).unwrap();
//! assert_eq!(start.actions.len(), 2); // the first command and its timer
//! let reply = Input::Reply {
//!     command_id: "s-1:reserve-stock:do:1".into(),
//!     outcome: Outcome::Ok { result: serde_json::Value::Null },
//! };
//! let next = saga.apply(&def, reply, now).unwrap();
//! assert_eq!(next.entry.seq, 2);
//! ```

pub mod definition;
pub mod protocol;
pub mod saga;
pub mod schema;
pub mod streams;

pub use definition::{Definition, RetryPolicy, Step, StepKind};
pub use saga::{
    Action, Actor, Cause, End, Entry, Input, Phase, Rejected, Saga, State, StepRecord, StepStatus,
    Transition, Wait,
};
pub use schema::Schema;
