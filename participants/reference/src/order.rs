//! The order the reference participants read from a saga's input.
//!
//! The orchestrator checks the input against the order-creation definition's JSON
//! Schema (`sagas/definitions/order-creation.input.schema.json`) before any step
//! runs; this is the participants' own typed view of the same document.

use serde::{Deserialize, Serialize};

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// The product.
    pub sku: String,
    /// How many, at least 1.
    pub quantity: u32,
}

/// The input of the order-creation saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Order {
    /// Who orders.
    pub customer_id: String,
    /// Where the confirmation goes.
    pub email: String,
    /// What is ordered, at least one line.
    pub items: Vec<Item>,
    /// The total, in the currency's minor unit, greater than zero.
    pub amount_cents: u64,
    /// ISO 4217 code, three upper-case letters.
    pub currency: String,
    /// The payment method; `tok_decline` is declined by the payment service.
    pub card_token: String,
}
