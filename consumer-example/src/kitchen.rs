//! The kitchen service: owns the `ingredients` table and, in the same
//! transaction as every change to it, writes the matching outbox event with
//! the `outbox` helper.

use std::time::Duration;

use opentelemetry::context::FutureExt;
use opentelemetry::trace::{TraceContextExt, Tracer};
use outbox::{Event, EventId};
use rand::Rng;
use sqlx::PgPool;

use crate::projection::{AGGREGATE_TYPE, IngredientRestocked, IngredientUsed, PriceChanged};

/// name, category, supplier, price in cents, allergens, minimum stock, shelf life in days.
type Seed = (
    &'static str,
    &'static str,
    &'static str,
    i32,
    &'static [&'static str],
    i32,
    i32,
);

/// The stand's ingredients.
pub const INGREDIENTS: [Seed; 8] = [
    (
        "brioche bun",
        "bread",
        "Bakehouse Bros",
        45,
        &["gluten", "egg", "milk"],
        40,
        4,
    ),
    ("beef patty", "meat", "Ranch & Co", 180, &[], 30, 3),
    ("vegan patty", "plant", "Green Grill", 160, &["soy"], 15, 10),
    ("cheddar", "dairy", "Valley Dairy", 35, &["milk"], 25, 20),
    ("lettuce", "produce", "Fresh Fields", 10, &[], 20, 5),
    ("tomato", "produce", "Fresh Fields", 15, &[], 20, 6),
    (
        "pickles",
        "preserve",
        "Brine Works",
        8,
        &["mustard"],
        10,
        90,
    ),
    (
        "burger sauce",
        "sauce",
        "House",
        12,
        &["egg", "mustard"],
        10,
        14,
    ),
];

/// One change the kitchen made, as written.
#[derive(Debug, Clone)]
pub struct Written {
    pub id: EventId,
    pub event_type: &'static str,
    pub name: String,
    /// The trace the event belongs to, when it was written inside a span.
    pub trace_id: Option<String>,
}

/// Creates the ingredients (stock 0) and restocks each, once. Returns the
/// events written (none when already seeded).
pub async fn seed(pool: &PgPool) -> anyhow::Result<Vec<Written>> {
    let mut written = Vec::new();
    for (name, category, supplier, price, allergens, min_stock, shelf_days) in INGREDIENTS {
        let mut tx = pool.begin().await?;
        let created = sqlx::query(
            "INSERT INTO ingredients (name, category, supplier, unit_price_cents, allergens, stock, min_stock, expires_on) \
             VALUES ($1, $2, $3, $4, $5, 0, $6, current_date + $7) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(category)
        .bind(supplier)
        .bind(price)
        .bind(allergens.iter().map(|a| a.to_string()).collect::<Vec<_>>())
        .bind(min_stock)
        .bind(shelf_days)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if created {
            written.push(restock(&mut tx, name, min_stock + 20).await?);
        }
        tx.commit().await?;
    }
    Ok(written)
}

async fn restock(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    name: &str,
    quantity: i32,
) -> anyhow::Result<Written> {
    let (min_stock, price): (i32, i32) = sqlx::query_as(
        "UPDATE ingredients SET stock = stock + $2, updated_at = now() WHERE name = $1 RETURNING min_stock, unit_price_cents",
    )
    .bind(name)
    .bind(quantity)
    .fetch_one(&mut **tx)
    .await?;
    let payload = IngredientRestocked {
        name: name.to_owned(),
        quantity,
        min_stock,
        unit_price_cents: price,
    };
    write(tx, name, "IngredientRestocked", &payload).await
}

async fn write<P: serde::Serialize>(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    name: &str,
    event_type: &'static str,
    payload: &P,
) -> anyhow::Result<Written> {
    let event = Event::new(AGGREGATE_TYPE, name, event_type, payload)?;
    let id = outbox::write(tx, &event).await?;
    Ok(Written {
        id,
        event_type,
        name: name.to_owned(),
        // `00-<trace id>-<span id>-<flags>`, as the helper wrote it.
        trace_id: event
            .trace_context()
            .and_then(|tp| tp.get(3..35))
            .map(str::to_owned),
    })
}

/// Makes one random change: mostly burgers using stock, sometimes a delivery,
/// now and then a price change. One transaction, one event.
pub async fn step(pool: &PgPool, rng: &mut impl Rng) -> anyhow::Result<Written> {
    let (name, ..) = INGREDIENTS[rng.random_range(0..INGREDIENTS.len())];
    let roll = rng.random_range(0..100);
    let mut tx = pool.begin().await?;
    let written = if roll < 65 {
        let quantity = rng.random_range(1..=6);
        let used: Option<i32> = sqlx::query_scalar(
            "UPDATE ingredients SET stock = stock - $2, updated_at = now() WHERE name = $1 AND stock >= $2 \
             RETURNING min_stock",
        )
        .bind(name)
        .bind(quantity)
        .fetch_optional(&mut *tx)
        .await?;
        match used {
            Some(min_stock) => {
                let payload = IngredientUsed {
                    name: name.to_owned(),
                    quantity,
                    min_stock,
                };
                write(&mut tx, name, "IngredientUsed", &payload).await?
            }
            // Out of it: the supplier comes.
            None => restock(&mut tx, name, rng.random_range(30..=80)).await?,
        }
    } else if roll < 90 {
        restock(&mut tx, name, rng.random_range(10..=60)).await?
    } else {
        let factor = rng.random_range(90..=112);
        let price: i32 = sqlx::query_scalar(
            "UPDATE ingredients SET unit_price_cents = greatest(1, unit_price_cents * $2 / 100), updated_at = now() \
             WHERE name = $1 RETURNING unit_price_cents",
        )
        .bind(name)
        .bind(factor)
        .fetch_one(&mut *tx)
        .await?;
        let payload = PriceChanged {
            name: name.to_owned(),
            unit_price_cents: price,
        };
        write(&mut tx, name, "PriceChanged", &payload).await?
    };
    tx.commit().await?;
    Ok(written)
}

/// The name of the kitchen's tracer.
pub const TRACER: &str = "outbox-kitchen";

/// Runs the kitchen at `rate` changes per second for `duration`, calling
/// `on_write` after each commit.
pub async fn run(
    pool: &PgPool,
    rate: u32,
    duration: Duration,
    token: &tokio_util::sync::CancellationToken,
    mut on_write: impl FnMut(&Written),
) -> anyhow::Result<Vec<Written>> {
    let mut rng = rand::rng();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    let deadline = tokio::time::Instant::now() + duration;
    let mut written = Vec::new();
    while tokio::time::Instant::now() < deadline {
        tokio::select! {
            biased;
            _ = token.cancelled() => break,
            _ = tick.tick() => {}
        }
        // Each change is one operation with its own span (from the global
        // tracer provider); the event written in it carries its context.
        let span = opentelemetry::global::tracer(TRACER).start("kitchen change");
        let cx = opentelemetry::Context::current_with_span(span);
        let w = step(pool, &mut rng).with_context(cx.clone()).await?;
        cx.span().end();
        on_write(&w);
        written.push(w);
    }
    Ok(written)
}
