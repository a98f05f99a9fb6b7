//! `outbox-relay migrate`: applies the embedded SQL migrations of the
//! `outbox` crate (outbox table, publication, relay bookkeeping) with sqlx.

use crate::{Error, Result};

/// Applies every pending migration.
pub async fn run(database_url: &str) -> Result<()> {
    // Parse with our own parser first so a malformed URL gets the same clear,
    // password-free message as `run` gives.
    let cfg = crate::postgres::config::PgConfig::from_url(database_url)?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(database_url)
        .await
        .map_err(|source| Error::Database {
            context: format!("connecting to {cfg}"),
            source: Box::new(source),
        })?;
    outbox::MIGRATOR.run(&pool).await?;
    pool.close().await;
    tracing::info!(database = %cfg, "migrations applied");
    Ok(())
}
