//! Test support lives in the `outbox-test-support` crate (`test-support/`),
//! shared with the benchmark; re-exported here so tests write `support::…`.

pub use outbox_test_support::*;
