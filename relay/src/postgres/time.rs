//! PostgreSQL's clock: timestamps on the wire (commit times, status
//! updates) are microseconds since 2000-01-01 00:00 UTC.

use std::time::{SystemTime, UNIX_EPOCH};

/// 2000-01-01 minus 1970-01-01, in microseconds.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Now, in PostgreSQL's clock format: microseconds since 2000-01-01.
pub fn pg_now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
        - PG_EPOCH_OFFSET_US
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_2000() {
        // 2026 is about 26 years after PostgreSQL's epoch.
        let years = pg_now_us() / 1_000_000 / (365 * 24 * 3600);
        assert!((25..100).contains(&years), "{years}");
    }
}
