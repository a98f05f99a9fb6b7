//! The producer: the relay's delivery settings, creating a producer and
//! serving its delivery reports, handing records over with backpressure,
//! and which fatal producer errors a new producer would not repeat.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _, ProducerContext};
use tokio_util::sync::CancellationToken;

use crate::kafka::config::{KafkaConfig, describe_config_error};
use crate::kafka::reports::ReportServer;
use crate::{Error, Result};

/// The producer's settings: the relay's delivery settings, then the user's
/// `--kafka-option`s (which cannot weaken them: see [`parse_kafka_option`](crate::kafka::config::parse_kafka_option)).
pub fn producer_config(cfg: &KafkaConfig, max_in_flight: usize) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &cfg.brokers)
        .set("client.id", "outbox-relay")
        // Idempotence gives acks=all and retries that keep per-partition order.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // librdkafka never gives up on a record by itself. With a finite
        // timeout, a long outage fails the oldest records, bumps the
        // idempotent producer's epoch and sends the records queued behind
        // them first: an aggregate's events reordered. The relay reports
        // a stalled delivery instead (log and metric) and keeps waiting.
        .set("message.timeout.ms", "0")
        // A record refused after it was sent leaves a gap in its
        // partition; without this librdkafka bumps the epoch and sends
        // the records behind it anyway. With it, the producer stops
        // (a fatal error) and the relay replays from its confirmed
        // position, sending the refused records one by one (see `stream`).
        .set("enable.gapless.guarantee", "true")
        // 1 ms, not librdkafka's 5: a record at a moderate rate waits at
        // most 1 ms for a batch to fill; under a backlog batches fill
        // regardless. bench/results/2026-11-23-linger/ compares 1 and 5.
        .set("linger.ms", "1")
        // librdkafka's own buffer never fills first: the relay's window
        // (--max-in-flight, --max-in-flight-bytes) bounds what is handed to
        // the producer, and stops reading WAL where the stream can go on
        // sending status updates (see `pipeline::progress`). A full
        // librdkafka buffer would refuse a record in the middle of handling
        // a message. The largest value librdkafka takes.
        .set("queue.buffering.max.kbytes", "2147483647")
        // A producer's metadata requests otherwise ask the broker to create
        // a missing topic (where `auto.create.topics.enable` is on, Kafka's
        // default), with the broker's defaults: the relay creates topics
        // only with --create-topics, and stops on a missing one without it.
        .set("allow.auto.create.topics", "false")
        .set(
            "queue.buffering.max.messages",
            (max_in_flight + 1024).max(10_000).to_string(),
        );
    for (k, v) in &cfg.options {
        client.set(k, v);
    }
    client
}

/// Creates a producer reporting deliveries to `context`, and starts serving
/// its delivery reports. `options` are the user's settings, redacted from
/// the error when librdkafka refuses them.
pub fn create<C: ProducerContext + 'static>(
    client: &ClientConfig,
    context: C,
    options: &[(String, String)],
) -> Result<(Arc<BaseProducer<C>>, ReportServer)> {
    let producer: BaseProducer<C> = client.create_with_context(context).map_err(|e| {
        Error::Config(format!(
            "the kafka producer settings are refused: {}",
            describe_config_error(&e, options)
        ))
    })?;
    let producer = Arc::new(producer);
    let reports = ReportServer::start(producer.clone())?;
    Ok((producer, reports))
}

/// What librdkafka last reported about its connections (a refused TLS
/// handshake, a failed SASL exchange, a broker that cannot be resolved).
/// A producer context records into it from `ClientContext::error`, so that a
/// start-up failure names its cause instead of a bare timeout.
#[derive(Debug, Default)]
pub struct ClientErrors {
    last: Mutex<Option<(Option<RDKafkaErrorCode>, String)>>,
}

impl ClientErrors {
    /// Records a global client error and logs it.
    pub fn record(&self, error: &KafkaError, reason: &str) {
        // librdkafka's reasons name brokers, states and TLS/SASL failures;
        // the tests check that passwords do not appear in them.
        tracing::warn!(error = %error, reason, "kafka client error");
        // "All broker connections are down" follows every connection
        // failure; keep the failure itself (TLS, SASL, resolution) instead.
        let code = error.rdkafka_error_code();
        if code == Some(RDKafkaErrorCode::AllBrokersDown) {
            return;
        }
        let telling = |c: Option<RDKafkaErrorCode>| {
            matches!(
                c,
                Some(
                    RDKafkaErrorCode::SSL
                        | RDKafkaErrorCode::Authentication
                        | RDKafkaErrorCode::SaslAuthenticationFailed
                )
            )
        };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        // A TLS or SASL failure explains what follows it (disconnects,
        // another bootstrap broker's resolve error); keep it.
        if last.as_ref().is_some_and(|(c, _)| telling(*c)) && !telling(code) {
            return;
        }
        *last = Some((code, format!("{error}: {reason}")));
    }

    /// The last recorded error, if any.
    pub fn last(&self) -> Option<String> {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, text)| text.clone())
    }
}

/// Fails with a clear error when no broker answers within `timeout`, naming
/// the last connection error librdkafka reported to `errors`.
pub async fn check_brokers<C: ProducerContext + 'static>(
    producer: &Arc<BaseProducer<C>>,
    errors: &ClientErrors,
    brokers: &str,
    timeout: Duration,
) -> Result<()> {
    metadata(producer, None, timeout)
        .await
        .map(|_| ())
        .map_err(|source| Error::BrokersUnreachable {
            brokers: brokers.to_owned(),
            source: Box::new(source),
            cause: errors
                .last()
                .map(|c| format!(" (last client error: {c})"))
                .unwrap_or_default(),
        })
}

/// The cluster's metadata (for one topic, or all), looked up on a blocking
/// thread: librdkafka's call blocks for up to `timeout`.
pub async fn metadata<C: ProducerContext + 'static>(
    producer: &Arc<BaseProducer<C>>,
    topic: Option<&str>,
    timeout: Duration,
) -> KafkaResult<Metadata> {
    let producer = producer.clone();
    let topic = topic.map(str::to_owned);
    tokio::task::spawn_blocking(move || producer.client().fetch_metadata(topic.as_deref(), timeout))
        .await
        .expect("metadata lookup does not panic")
}

/// Waits until everything handed to the producer is acknowledged or failed.
pub async fn flush<C: ProducerContext + 'static>(
    producer: &Arc<BaseProducer<C>>,
    timeout: Duration,
) -> Result<()> {
    let producer = producer.clone();
    tokio::task::spawn_blocking(move || producer.flush(timeout))
        .await
        .expect("flush does not panic")
        .map_err(|source| Error::Kafka {
            context: "flushing the kafka producer".into(),
            source: Box::new(source),
        })
}

/// Hands `record` to the producer, waiting while librdkafka's buffer is full
/// (until `stop`). `event_id` names the record in errors. The buffer is
/// sized beyond the relay's window (`producer_config`), so the wait is a
/// safety net: while it lasts the caller's loop does not turn.
pub async fn send<'a, C: ProducerContext<DeliveryOpaque = usize>>(
    producer: &BaseProducer<C>,
    mut record: BaseRecord<'a, [u8], [u8], usize>,
    event_id: &str,
    stop: &CancellationToken,
) -> Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            // librdkafka's buffer is full: wait for deliveries to free it.
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => {
                        return Err(Error::Io {
                            context: format!("handing event {event_id} to the kafka producer"),
                            source: std::io::Error::new(
                                std::io::ErrorKind::Interrupted,
                                "stopped while the producer's buffer was full; it is sent again at the next start",
                            ),
                        });
                    }
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
            Err((source, r)) => {
                return Err(Error::Delivery {
                    event_id: event_id.to_owned(),
                    topic: r.topic.to_owned(),
                    source: Box::new(source),
                });
            }
        }
    }
}

/// Whether a producer that stopped with this error is replaced (and the
/// session resent), rather than the relay stopping: yes for errors tied to
/// the stopped producer's id and sequence numbers, which a new producer does
/// not inherit; no for authorization, authentication and version errors,
/// which would stop every new producer too.
pub fn replaceable(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    !matches!(
        code,
        C::ClusterAuthorizationFailed
            | C::TopicAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication
            | C::UnsupportedVersion
            | C::UnsupportedForMessageFormat
            | C::UnsupportedFeature
            | C::InvalidConfig
            | C::InvalidArgument
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Path 2 of issue 9 (the default): librdkafka never fails a record by
    /// itself, and a refused record stops the producer rather than letting
    /// the records behind it through; librdkafka accepts the combination.
    #[test]
    fn the_producer_never_gives_up_and_never_skips_a_refused_record() {
        let cfg = KafkaConfig {
            brokers: "127.0.0.1:1".into(),
            options: vec![("linger.ms".into(), "5".into())],
            create_topics: false,
            topic_partitions: None,
            topic_replication_factor: None,
        };
        let client = producer_config(&cfg, 100);
        for (key, want) in [
            ("message.timeout.ms", "0"),
            ("enable.gapless.guarantee", "true"),
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "5"),
        ] {
            assert_eq!(client.get(key), Some(want), "{key}");
        }
        client
            .create::<rdkafka::producer::BaseProducer>()
            .expect("librdkafka accepts the relay's settings");
    }

    /// This build speaks TLS and SASL SCRAM (the rdkafka `ssl` feature);
    /// OIDC token fetching (libcurl) is not built, and says so at start.
    #[test]
    fn tls_and_scram_are_built_and_oidc_is_refused_by_name() {
        let with = |options: &[(&str, &str)]| {
            let mut client = ClientConfig::new();
            client.set("bootstrap.servers", "127.0.0.1:1");
            for (k, v) in options {
                client.set(*k, *v);
            }
            client
                .create::<rdkafka::producer::BaseProducer>()
                .map(|_| ())
        };
        with(&[("security.protocol", "SSL")]).expect("TLS is built");
        with(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "relay"),
            ("sasl.password", "pw"),
        ])
        .expect("SCRAM is built");
        let err = with(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "OAUTHBEARER"),
            ("sasl.oauthbearer.method", "oidc"),
        ])
        .expect_err("OIDC needs libcurl, which is not built");
        assert!(
            err.to_string().contains("not supported in this build"),
            "{err}"
        );
    }

    #[test]
    fn all_brokers_down_does_not_hide_the_cause() {
        let errors = ClientErrors::default();
        assert_eq!(errors.last(), None);
        errors.record(
            &KafkaError::Global(RDKafkaErrorCode::SSL),
            "SSL handshake failed: certificate verify failed",
        );
        errors.record(
            &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        errors.record(
            &KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            "b2:9092/bootstrap: Disconnected",
        );
        let last = errors.last().expect("recorded");
        assert!(last.contains("certificate verify failed"), "{last}");
    }
}
