//! The relay's error type, and the one place that decides which failures are
//! retried (reconnect and resume from the slot) and which stop the relay.

use std::fmt;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Result of relay operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error reported by the PostgreSQL server (an ErrorResponse).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgError {
    /// `ERROR`, `FATAL` or `PANIC`.
    pub severity: String,
    /// The SQLSTATE code.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// Optional detail.
    pub detail: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(detail) = &self.detail {
            write!(f, "; detail: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PgError {}

/// Everything that can stop or interrupt the relay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid configuration, found before any connection is made.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A network failure talking to PostgreSQL.
    #[error("{context}: {source}")]
    Io {
        /// What the relay was doing.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// PostgreSQL refused a command.
    #[error("{context}: {source}")]
    Server {
        /// What the relay was doing.
        context: String,
        /// The server's error.
        source: Box<PgError>,
    },

    /// TLS could not be set up as the `sslmode` demands.
    #[error("tls: {0}")]
    Tls(String),

    /// Authentication could not be completed.
    #[error("authentication: {0}")]
    Auth(String),

    /// The server sent something the wire protocol does not allow here.
    #[error("postgres protocol error: {0}")]
    Protocol(String),

    /// A replication message could not be decoded.
    #[error("decoding the replication stream failed at {lsn}: {source}")]
    Decode {
        /// Position of the offending message, as PostgreSQL prints it.
        lsn: String,
        /// What was wrong (a `pgoutput` decoding error). Boxed so that this
        /// module, which every layer uses, depends on none of them.
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The database is not set up for logical decoding.
    #[error(
        "wal_level is `{actual}` but logical decoding needs `logical`; set `wal_level = logical` \
         in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"
    )]
    WalLevel {
        /// The current setting.
        actual: String,
    },

    /// The publication to read from does not exist.
    #[error(
        "publication `{name}` does not exist in database `{database}`; apply the migrations \
         (`outbox-relay migrate`) or create it with \
         `CREATE PUBLICATION {name} FOR TABLE outbox WITH (publish = 'insert')`, or pass the right --publication"
    )]
    PublicationMissing {
        /// The publication's name.
        name: String,
        /// The database it was looked up in.
        database: String,
    },

    /// The slot exists but cannot be used by this relay.
    #[error("replication slot `{slot}` cannot be used: {reason}")]
    SlotUnusable {
        /// The slot's name.
        slot: String,
        /// Why.
        reason: String,
    },

    /// A row of the outbox cannot be turned into a Kafka record.
    #[error("outbox event {event_id} cannot be published: {reason}")]
    BadEvent {
        /// The event id (or `unknown` when the id itself is unreadable).
        event_id: String,
        /// What is wrong with it and how to fix it.
        reason: String,
    },

    /// A published table does not look like an outbox.
    #[error("table {table} is in the publication but is not an outbox table: {reason}")]
    NotAnOutbox {
        /// `schema.table`.
        table: String,
        /// What is missing.
        reason: String,
    },

    /// The topic for an event does not exist and may not be created.
    #[error(
        "kafka topic `{topic}` does not exist (needed by {needed_by}); create it, or run the \
         relay with --create-topics"
    )]
    TopicMissing {
        /// The topic.
        topic: String,
        /// What needs it: an event, or the dead-letter setting.
        needed_by: String,
    },

    /// The brokers could not be reached at start.
    #[error(
        "cannot reach the kafka brokers at `{brokers}`: {source}{cause}; check --kafka-brokers \
         (OUTBOX_KAFKA_BROKERS), that the brokers are up, and the security settings \
         (security.protocol, ssl.ca.location, sasl.*) in --kafka-option"
    )]
    BrokersUnreachable {
        /// The configured bootstrap servers.
        brokers: String,
        /// The client's error.
        source: Box<KafkaError>,
        /// What librdkafka last said about its connections, with a leading
        /// ` (last client error: ...)`, or empty.
        cause: String,
    },

    /// Kafka refused or failed to take an event.
    #[error("kafka did not accept event {event_id} for topic `{topic}`: {source}")]
    Delivery {
        /// The event.
        event_id: String,
        /// Its topic.
        topic: String,
        /// The error.
        source: Box<KafkaError>,
    },

    /// An undeliverable event could not be parked in the dead-letter topic either.
    #[error(
        "event {event_id} is undeliverable ({reason}) and the dead-letter topic did not take it either: {source}"
    )]
    DeadLetterFailed {
        /// The event.
        event_id: String,
        /// Why it was undeliverable.
        reason: String,
        /// Why the dead letter failed.
        source: Box<Error>,
    },

    /// Kafka refused a batch of records in its delivery report. A broker
    /// refuses whole batches, so which record is at fault is not known: the
    /// session is replayed with the refused records sent one at a time.
    #[error(
        "kafka refused the batch holding event {event_id} for topic `{topic}` ({source}); \
         resending from the last confirmed position with each refused event sent on its own"
    )]
    BatchRefused {
        /// The first refused event.
        event_id: String,
        /// Its topic.
        topic: String,
        /// The broker's error.
        source: Box<KafkaError>,
    },

    /// Kafka refused an event sent on its own, under the dead-letter policy:
    /// the next session parks it in its place.
    #[error(
        "kafka refused event {event_id} on its own ({source}); it goes to the dead-letter topic \
         in its place once the producer restarts"
    )]
    RefusedAlone {
        /// The refused event.
        event_id: String,
        /// The refusal (an `Error::Delivery`).
        source: Box<Error>,
    },

    /// A stop whose records were not all acknowledged in time.
    #[error(
        "kafka did not acknowledge {outstanding} event(s) within the shutdown timeout of \
         {timeout:?}; they were not confirmed and will be sent again at the next start"
    )]
    Unacknowledged {
        /// Records handed to the producer without a delivery report.
        outstanding: usize,
        /// The shutdown timeout.
        timeout: std::time::Duration,
    },

    /// Any other Kafka client failure.
    #[error("{context}: {source}")]
    Kafka {
        /// What the relay was doing.
        context: String,
        /// The error.
        source: Box<KafkaError>,
    },

    /// sqlx failed (migrations and bookkeeping).
    #[error("{context}: {source}")]
    Database {
        /// What the relay was doing.
        context: String,
        /// The error.
        source: Box<sqlx::Error>,
    },

    /// Applying migrations failed.
    #[error("applying migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl Error {
    /// Whether the relay should reconnect and resume from the slot (true), or
    /// stop and report (false). Retrying is always safe for correctness,
    /// because nothing is confirmed past what Kafka acknowledged; it is wrong
    /// only when the same failure would repeat forever.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io { .. } => true,
            Error::Server { source, .. } => pg_code_is_retryable(&source.code),
            Error::Delivery { source, .. } | Error::Kafka { source, .. } => {
                matches!(
                    kafka_fault(source),
                    KafkaFault::Transient | KafkaFault::TopicUnknown
                )
            }
            // The batch is replayed with the suspect records sent one by one.
            Error::BatchRefused { .. } | Error::RefusedAlone { .. } => true,
            Error::DeadLetterFailed { source, .. } => source.is_retryable(),
            Error::Database { source, .. } => matches!(
                **source,
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
            ),
            Error::Config(_)
            | Error::Tls(_)
            | Error::Auth(_)
            | Error::Protocol(_)
            | Error::Decode { .. }
            | Error::WalLevel { .. }
            | Error::PublicationMissing { .. }
            | Error::SlotUnusable { .. }
            | Error::BadEvent { .. }
            | Error::NotAnOutbox { .. }
            | Error::TopicMissing { .. }
            | Error::BrokersUnreachable { .. }
            | Error::Unacknowledged { .. }
            | Error::Migrate(_) => false,
        }
    }
}

/// What a Kafka error means for the relay. This is the one place that
/// decides; every Kafka error the relay meets goes through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaFault {
    /// A passing condition (broker down, leader moving, timeouts): wait, or
    /// reconnect and resume from the slot.
    Transient,
    /// The record itself is refused and will be refused again (too large,
    /// invalid, rejected by a broker policy). Under `--on-undeliverable
    /// dead-letter` such a record is parked, but only once it is known to be
    /// the record's own fault: when raised at hand-over, or when the record
    /// was sent on its own (a broker refuses whole batches).
    Record,
    /// The topic is missing or unknown right now (deleted, not yet created):
    /// configuration, not a bad event. The session is retried and the topic
    /// checked again, which stops with `TopicMissing` unless
    /// `--create-topics` is on.
    TopicUnknown,
    /// Anything else, including errors this version does not know: stop,
    /// rather than republish the tail forever or park an event that may be
    /// fine.
    Fatal,
}

/// Classifies a Kafka error; see [`KafkaFault`].
pub fn kafka_fault(err: &KafkaError) -> KafkaFault {
    use RDKafkaErrorCode as C;
    let code = match err {
        KafkaError::MessageProduction(code)
        | KafkaError::AdminOp(code)
        | KafkaError::MetadataFetch(code)
        | KafkaError::Flush(code) => *code,
        KafkaError::ClientCreation(_) | KafkaError::ClientConfig(..) => return KafkaFault::Fatal,
        KafkaError::Canceled => return KafkaFault::Transient,
        _ => return KafkaFault::Fatal,
    };
    match code {
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::InvalidMessage
        | C::InvalidRecord
        | C::InvalidTimestamp
        | C::PolicyViolation
        | C::MessageBatchTooLarge => KafkaFault::Record,
        C::UnknownTopic | C::UnknownTopicOrPartition | C::UnknownPartition => {
            KafkaFault::TopicUnknown
        }
        C::MessageTimedOut
        | C::AllBrokersDown
        | C::BrokerTransportFailure
        | C::Resolve
        | C::RequestTimedOut
        | C::OperationTimedOut
        | C::TimedOutQueue
        | C::WaitCache
        | C::NotLeaderForPartition
        | C::LeaderNotAvailable
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::NetworkException
        | C::BrokerNotAvailable
        | C::ReplicaNotAvailable
        | C::NotController
        | C::CoordinatorNotAvailable
        | C::NotCoordinator
        | C::CoordinatorLoadInProgress
        | C::KafkaStorageError
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::OffsetNotAvailable
        | C::PreferredLeaderNotAvailable
        | C::ThrottlingQuotaExceeded
        | C::QueueFull
        | C::WaitingForCoordinator
        | C::PurgeQueue
        | C::PurgeInflight
        | C::BrokerDestroy
        // The producer stopped for good (after a refusal, under the gapless
        // guarantee): the relay replaces it and resends from the slot.
        | C::Fatal => KafkaFault::Transient,
        _ => KafkaFault::Fatal,
    }
}

/// SQLSTATE classes worth retrying: connection exceptions (08), insufficient
/// resources (53), operator intervention such as a shutdown or a server still
/// starting (57), transaction rollbacks (40), and `object_in_use` (55006),
/// which is what "replication slot is active for PID" raises while a previous
/// relay instance is still shutting down during a rolling deploy.
pub fn pg_code_is_retryable(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57")
        || code.starts_with("40")
        || code == "55006"
}

impl Error {
    /// Whether the error is about one event that Kafka will never take (or a
    /// row that is not a valid event), as opposed to the relay's setup or a
    /// passing outage: what `--on-undeliverable dead-letter` parks.
    pub fn is_undeliverable(&self) -> bool {
        match self {
            Error::BadEvent { .. } => true,
            Error::Delivery { source, .. } => kafka_fault(source) == KafkaFault::Record,
            _ => false,
        }
    }

    /// Whether Kafka refused a record (as opposed to the relay being
    /// interrupted): a stop during which this happened does not exit 0.
    pub fn is_refusal(&self) -> bool {
        match self {
            Error::BatchRefused { .. } | Error::RefusedAlone { .. } => true,
            // A dead letter that could not be handed over because of a stop
            // is not a refusal.
            Error::DeadLetterFailed { source, .. } => {
                source.is_refusal() || matches!(**source, Error::Delivery { .. })
            }
            Error::Delivery { source, .. } => !matches!(
                **source,
                KafkaError::MessageProduction(
                    RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight
                )
            ),
            _ => false,
        }
    }

    /// Whether the record was refused for its size (its value is then not
    /// repeated in the dead letter).
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            Error::Delivery { source, .. } if matches!(
                **source,
                KafkaError::MessageProduction(
                    RDKafkaErrorCode::MessageSizeTooLarge
                        | RDKafkaErrorCode::InvalidMessageSize
                        | RDKafkaErrorCode::MessageBatchTooLarge
                )
            )
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_postgres_errors() {
        for code in ["08006", "57P01", "57P03", "53300", "55006", "40001"] {
            assert!(pg_code_is_retryable(code), "{code}");
        }
        for code in ["28P01", "3D000", "42704", "42501", "XX000"] {
            assert!(!pg_code_is_retryable(code), "{code}");
        }
    }

    /// Path 7 of issue 9: permanent errors that were not classified looped
    /// forever republishing the tail. Every code lands in one class, and
    /// codes not known here stop the relay.
    #[test]
    fn classifies_kafka_errors() {
        use RDKafkaErrorCode as C;
        let fault = |c| kafka_fault(&KafkaError::MessageProduction(c));
        for code in [
            C::MessageSizeTooLarge,
            C::InvalidRecord,
            C::PolicyViolation,
            C::MessageBatchTooLarge,
        ] {
            assert_eq!(fault(code), KafkaFault::Record, "{code:?}");
        }
        for code in [C::UnknownTopicOrPartition, C::UnknownTopic] {
            assert_eq!(fault(code), KafkaFault::TopicUnknown, "{code:?}");
        }
        for code in [
            C::MessageTimedOut,
            C::AllBrokersDown,
            C::NotLeaderForPartition,
            C::QueueFull,
            C::Fatal,
        ] {
            assert_eq!(fault(code), KafkaFault::Transient, "{code:?}");
        }
        for code in [
            C::TopicAuthorizationFailed,
            C::ClusterAuthorizationFailed,
            C::InvalidRequest,
            C::GaplessGuarantee,
            C::InvalidTopic,
            C::UnsupportedVersion,
            C::OutOfOrderSequenceNumber,
        ] {
            assert_eq!(fault(code), KafkaFault::Fatal, "{code:?}");
        }
        assert_eq!(
            kafka_fault(&KafkaError::ClientCreation("x".into())),
            KafkaFault::Fatal
        );
        let delivery = |c| Error::Delivery {
            event_id: "e".into(),
            topic: "t".into(),
            source: Box::new(KafkaError::MessageProduction(c)),
        };
        // Unknown and fatal codes neither retry nor dead-letter.
        assert!(!delivery(C::InvalidRequest).is_retryable());
        assert!(!delivery(C::InvalidRequest).is_undeliverable());
        assert!(delivery(C::UnknownTopicOrPartition).is_retryable());
        assert!(!delivery(C::UnknownTopicOrPartition).is_undeliverable());
        assert!(delivery(C::MessageSizeTooLarge).is_undeliverable());
        assert!(delivery(C::MessageSizeTooLarge).is_too_large());
    }

    #[test]
    fn messages_are_lowercase_and_actionable() {
        let err = Error::WalLevel {
            actual: "replica".into(),
        };
        assert!(err.to_string().starts_with("wal_level is `replica`"));
        assert!(!err.is_retryable());
        let err = Error::Server {
            context: "connecting".into(),
            source: Box::new(PgError {
                severity: "FATAL".into(),
                code: "57P01".into(),
                message: "terminating connection due to administrator command".into(),
                ..PgError::default()
            }),
        };
        assert!(err.is_retryable());
        assert_eq!(
            err.to_string(),
            "connecting: terminating connection due to administrator command (SQLSTATE 57P01)"
        );
    }
}
