//! The order-creation input and its validation.
//!
//! The orchestrator checks a start input against the definition's [`InputKind`]
//! before any step runs, so a bad order never reaches a participant.

use serde::{Deserialize, Serialize};

use crate::definition::InputKind;

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
    /// The payment method; `tok_decline` is declined by the reference payment service.
    pub card_token: String,
}

/// Why a start input was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid input: {0}")]
pub struct InvalidInput(pub String);

impl Order {
    /// Checks the business rules serde cannot express.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        let fail = |m: &str| Err(InvalidInput(m.to_owned()));
        if self.customer_id.trim().is_empty() {
            return fail("customer_id is empty");
        }
        let (user, domain) = self.email.split_once('@').unwrap_or(("", ""));
        if user.is_empty() || !domain.contains('.') || self.email.contains(char::is_whitespace) {
            return fail("email is not an email address");
        }
        if self.items.is_empty() {
            return fail("items is empty");
        }
        if self.items.len() > 100 {
            return fail("items has more than 100 lines");
        }
        for (i, item) in self.items.iter().enumerate() {
            if item.sku.trim().is_empty() {
                return Err(InvalidInput(format!("items[{i}].sku is empty")));
            }
            if item.quantity == 0 {
                return Err(InvalidInput(format!(
                    "items[{i}].quantity must be at least 1"
                )));
            }
        }
        if self.amount_cents == 0 {
            return fail("amount_cents must be greater than zero");
        }
        if self.currency.len() != 3 || !self.currency.chars().all(|c| c.is_ascii_uppercase()) {
            return fail("currency must be three upper-case letters (ISO 4217)");
        }
        if self.card_token.trim().is_empty() {
            return fail("card_token is empty");
        }
        Ok(())
    }
}

/// Checks a start input against the validator a definition names.
pub fn validate_input(kind: InputKind, input: &serde_json::Value) -> Result<(), InvalidInput> {
    match kind {
        InputKind::Object => {
            if input.is_object() {
                Ok(())
            } else {
                Err(InvalidInput("the input must be a JSON object".to_owned()))
            }
        }
        InputKind::Order => {
            let order: Order = serde_path_to_error::deserialize(input).map_err(|e| {
                match e.path().to_string().as_str() {
                    "." => InvalidInput(e.inner().to_string()),
                    path => InvalidInput(format!("{path}: {}", e.inner())),
                }
            })?;
            order.validate()
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn accepts_the_documented_order_and_names_each_problem() {
        let good = json!({"customer_id": "c-42", "email": "ana@example.com",
            "items": [{"sku": "sku-1", "quantity": 2}], "amount_cents": 4999,
            "currency": "EUR", "card_token": "tok_ok"});
        assert_eq!(validate_input(InputKind::Order, &good), Ok(()));

        let cases = [
            ("email", json!("nope"), "email"),
            ("items", json!([]), "items is empty"),
            (
                "items",
                json!([{"sku": "x", "quantity": 0}]),
                "items[0].quantity",
            ),
            ("amount_cents", json!(0), "amount_cents"),
            ("amount_cents", json!(-5), "amount_cents"),
            ("currency", json!("euro"), "currency"),
            ("card_token", json!(""), "card_token"),
            ("extra", json!(1), "unknown field `extra`"),
        ];
        for (field, value, expected) in cases {
            let mut bad = good.clone();
            bad[field] = value;
            let err = validate_input(InputKind::Order, &bad).unwrap_err();
            assert!(err.0.contains(expected), "{field}: {err}");
        }
        let mut missing = good;
        missing.as_object_mut().unwrap().remove("email");
        assert!(
            validate_input(InputKind::Order, &missing)
                .unwrap_err()
                .0
                .contains("email")
        );
        assert!(validate_input(InputKind::Object, &json!([1])).is_err());
        assert!(validate_input(InputKind::Object, &json!({})).is_ok());
    }
}
