//! The shipped order-creation definition, loaded once.

use std::sync::LazyLock;

use jetsaga_sagas::Definition;

pub(crate) static ORDER: LazyLock<Definition> = LazyLock::new(|| {
    Definition::parse_with(
        "order-creation.toml",
        include_str!("../../sagas/definitions/order-creation.toml"),
        |_| Ok(include_str!("../../sagas/definitions/order-creation.input.schema.json").to_owned()),
    )
    .expect("the shipped definition")
});
