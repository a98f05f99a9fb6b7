//! The kitchen's events and the stock projection they drive: decoding a
//! record's payload by its event type, and applying it to `stock_view` (and
//! `low_stock`) inside the consumer's transaction.

use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

/// Aggregate type of the kitchen's events; their topic is `outbox.event.ingredient`.
pub const AGGREGATE_TYPE: &str = "ingredient";

/// Stock arrived from a supplier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngredientRestocked {
    pub name: String,
    pub quantity: i32,
    pub min_stock: i32,
    pub unit_price_cents: i32,
}

/// Stock went into burgers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngredientUsed {
    pub name: String,
    pub quantity: i32,
    pub min_stock: i32,
}

/// The supplier changed the price.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceChanged {
    pub name: String,
    pub unit_price_cents: i32,
}

/// A decoded kitchen event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KitchenEvent {
    Restocked(IngredientRestocked),
    Used(IngredientUsed),
    PriceChanged(PriceChanged),
}

impl KitchenEvent {
    /// Decodes a payload by its `event_type` header. The error is the
    /// dead-letter reason.
    pub fn decode(event_type: &str, payload: &[u8]) -> Result<Self, String> {
        fn parse<T: for<'de> Deserialize<'de>>(
            event_type: &str,
            payload: &[u8],
        ) -> Result<T, String> {
            serde_json::from_slice(payload)
                .map_err(|e| format!("payload is not a valid {event_type}: {e}"))
        }
        let event = match event_type {
            "IngredientRestocked" => Self::Restocked(parse(event_type, payload)?),
            "IngredientUsed" => Self::Used(parse(event_type, payload)?),
            "PriceChanged" => Self::PriceChanged(parse(event_type, payload)?),
            other => return Err(format!("unknown event type `{other}`")),
        };
        let (name, quantity) = match &event {
            Self::Restocked(e) => (&e.name, Some(e.quantity)),
            Self::Used(e) => (&e.name, Some(e.quantity)),
            Self::PriceChanged(e) => (&e.name, None),
        };
        if name.is_empty() {
            return Err(format!(
                "payload of {event_type} has an empty ingredient name"
            ));
        }
        if quantity.is_some_and(|q| q <= 0) {
            return Err(format!(
                "payload of {event_type} has a quantity that is not positive"
            ));
        }
        Ok(event)
    }

    /// The ingredient it concerns.
    pub fn name(&self) -> &str {
        match self {
            Self::Restocked(e) => &e.name,
            Self::Used(e) => &e.name,
            Self::PriceChanged(e) => &e.name,
        }
    }
}

/// What applying an event did to the projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Stock after the event.
    pub stock: i32,
    /// Whether the event took stock below the minimum (a `low_stock` row).
    pub low_stock: bool,
}

/// Applies one event to `stock_view` in the caller's transaction. Stock moves
/// by deltas, so applying an event twice would show: the inbox prevents it.
pub async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    event: &KitchenEvent,
    event_id: Uuid,
) -> sqlx::Result<Applied> {
    let (delta, min_stock, price) = match event {
        KitchenEvent::Restocked(e) => (e.quantity, Some(e.min_stock), Some(e.unit_price_cents)),
        KitchenEvent::Used(e) => (-e.quantity, Some(e.min_stock), None),
        KitchenEvent::PriceChanged(e) => (0, None, Some(e.unit_price_cents)),
    };
    let before: Option<i32> =
        sqlx::query_scalar("SELECT stock FROM stock_view WHERE name = $1 FOR UPDATE")
            .bind(event.name())
            .fetch_optional(&mut **tx)
            .await?;
    let (stock, min_stock): (i32, i32) = sqlx::query_as(
        "INSERT INTO stock_view (name, stock, min_stock, unit_price_cents, last_event_id) \
         VALUES ($1, $2, coalesce($3, 0), coalesce($4, 0), $5) \
         ON CONFLICT (name) DO UPDATE SET \
           stock = stock_view.stock + $2, \
           min_stock = coalesce($3, stock_view.min_stock), \
           unit_price_cents = coalesce($4, stock_view.unit_price_cents), \
           last_event_id = $5, updated_at = now() \
         RETURNING stock, min_stock",
    )
    .bind(event.name())
    .bind(delta)
    .bind(min_stock)
    .bind(price)
    .bind(event_id)
    .fetch_one(&mut **tx)
    .await?;
    let was_above = before.is_none_or(|b| b >= min_stock);
    let low_stock = matches!(event, KitchenEvent::Used(_)) && was_above && stock < min_stock;
    if low_stock {
        sqlx::query(
            "INSERT INTO low_stock (name, stock, min_stock, event_id) VALUES ($1, $2, $3, $4)",
        )
        .bind(event.name())
        .bind(stock)
        .bind(min_stock)
        .bind(event_id)
        .execute(&mut **tx)
        .await?;
    }
    Ok(Applied { stock, low_stock })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_event_type() {
        let e = KitchenEvent::decode(
            "IngredientUsed",
            br#"{"name": "bun", "quantity": 2, "min_stock": 10}"#,
        )
        .unwrap();
        assert_eq!(
            e,
            KitchenEvent::Used(IngredientUsed {
                name: "bun".into(),
                quantity: 2,
                min_stock: 10
            })
        );
        assert!(
            KitchenEvent::decode(
                "PriceChanged",
                br#"{"name": "bun", "unit_price_cents": 50}"#
            )
            .is_ok()
        );
        assert!(
            KitchenEvent::decode(
                "IngredientRestocked",
                br#"{"name": "bun", "quantity": 5, "min_stock": 1, "unit_price_cents": 50}"#
            )
            .is_ok()
        );
    }

    #[test]
    fn gives_dead_letter_reasons() {
        let err = KitchenEvent::decode("Cooked", b"{}").unwrap_err();
        assert_eq!(err, "unknown event type `Cooked`");
        let err = KitchenEvent::decode("IngredientUsed", b"not json").unwrap_err();
        assert!(
            err.starts_with("payload is not a valid IngredientUsed"),
            "{err}"
        );
        let err = KitchenEvent::decode("IngredientUsed", br#"{"name": "bun"}"#).unwrap_err();
        assert!(err.contains("missing field `quantity`"), "{err}");
        let err = KitchenEvent::decode(
            "IngredientUsed",
            br#"{"name": "bun", "quantity": -1, "min_stock": 0}"#,
        )
        .unwrap_err();
        assert!(err.contains("not positive"), "{err}");
    }
}
