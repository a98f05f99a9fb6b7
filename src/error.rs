//! The error type of the outbox library: validation failures (caught before
//! the database sees anything) and database failures.

/// Result of outbox library calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while building or writing an outbox event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A required text field is empty.
    #[error("outbox event field `{field}` must not be empty")]
    EmptyField {
        /// The field's name.
        field: &'static str,
    },

    /// A text field contains a NUL character, which PostgreSQL text cannot store.
    #[error(
        "outbox event field `{field}` contains a NUL character, which PostgreSQL text cannot store"
    )]
    NulCharacter {
        /// The field's name.
        field: &'static str,
    },

    /// The serialized payload is larger than the configured maximum.
    #[error(
        "outbox event payload is {size} bytes, over the limit of {max} bytes; \
         split the event, or raise the limit with `Outbox::max_payload_bytes` \
         together with the broker's `message.max.bytes`"
    )]
    PayloadTooLarge {
        /// Size of the JSON payload in bytes.
        size: usize,
        /// The configured limit.
        max: usize,
    },

    /// The payload could not be serialized to JSON.
    #[error("outbox event payload cannot be serialized to JSON: {0}")]
    Payload(#[source] serde_json::Error),

    /// A header name or value is not acceptable.
    #[error("invalid outbox event header `{name}`: {reason}")]
    InvalidHeader {
        /// The header's name.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// The topic override is not a legal Kafka topic name.
    #[error("invalid topic override `{topic}`: {reason}")]
    InvalidTopic {
        /// The refused topic name.
        topic: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// The value is not a W3C `tracestate` (the first 64 characters kept).
    #[error(
        "invalid tracestate `{value}`: {reason}; expected a W3C tracestate such as \
         `vendor1=opaque1,vendor2=opaque2`"
    )]
    InvalidTraceState {
        /// The refused value.
        value: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// The trace context is not a W3C `traceparent` value.
    #[error(
        "invalid trace context `{value}`: {reason}; expected a W3C traceparent such as \
         `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`"
    )]
    InvalidTraceContext {
        /// The refused value.
        value: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// A text is not an event id (a UUID).
    #[error(
        "`{value}` is not an event id; expected a UUID such as 0190c2f0-7b4a-7cc1-9b1e-5f7a2f0b9d11"
    )]
    InvalidEventId {
        /// The refused text (at most 64 characters of it).
        value: String,
    },

    /// The database refused the write (sqlx).
    #[error("the outbox or inbox statement failed in the database: {0}")]
    Database(#[from] sqlx::Error),

    /// The database refused the write (tokio-postgres).
    #[cfg(feature = "tokio-postgres")]
    #[error("the outbox or inbox statement failed in the database: {0}")]
    TokioPostgres(#[from] ::tokio_postgres::Error),
}
