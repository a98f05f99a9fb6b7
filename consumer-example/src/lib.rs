//! An idempotent consumer of outbox events, on the example domain of a burger
//! stand: a kitchen service changes its `ingredients` and writes events with
//! the outbox helper; a stock consumer keeps a `stock_view` projection and
//! raises `low_stock` alerts, applying each event exactly once through the
//! inbox, and parks unusable messages in `dead_letter`.

pub mod consume;
pub mod kitchen;
pub mod projection;

/// The example's tables (idempotent DDL). The outbox, relay bookkeeping and
/// inbox tables come from `outbox::MIGRATOR`.
pub const SCHEMA: &str = include_str!("schema.sql");

/// Applies the outbox migrations and the example's tables.
pub async fn setup(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    outbox::MIGRATOR.run(pool).await?;
    sqlx::raw_sql(SCHEMA).execute(pool).await?;
    Ok(())
}
