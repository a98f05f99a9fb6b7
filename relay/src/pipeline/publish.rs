//! Publishing events to Kafka: the idempotent producer, topic resolution
//! (per-row override or template) and existence checks, record layout
//! (key, value, headers), and waiting on delivery reports.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer as _};
use tokio_util::sync::CancellationToken;

use crate::kafka::config::KafkaConfig;
use crate::kafka::delivery::{Deliveries, Producer, ReportServer};
use crate::metrics::Metrics;
use crate::pipeline::dead_letter::DeadLetter;
use crate::pipeline::event::OutboxEvent;
use crate::pipeline::progress::{Ledger, Refused, Ticket};
use crate::pipeline::topic::TopicTemplate;
use crate::{Error, Result};

/// `send`, waiting while librdkafka's buffer is full (until `stop`).
async fn send_with_backpressure<'a>(
    producer: &Producer,
    mut record: BaseRecord<'a, [u8], [u8], usize>,
    event_id: &str,
    stop: &CancellationToken,
) -> Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => {
                producer.context().ledger().handed();
                return Ok(());
            }
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

/// The Kafka side of the relay.
pub struct Publisher {
    producer: Arc<Producer>,
    /// Serves delivery reports while the publisher lives.
    reports: ReportServer,
    /// The producer's settings, to make a new one after a fatal error.
    client: ClientConfig,
    ledger: Arc<Ledger>,
    /// Events Kafka refused as part of a batch: the next session sends each
    /// of them on its own, to learn whether the event itself is refused.
    suspects: HashSet<String>,
    /// Events Kafka refused when sent on their own, under the dead-letter
    /// policy: the next session parks each in its place.
    condemned: std::collections::HashMap<String, DeadLetter>,
    admin: AdminClient<DefaultClientContext>,
    cfg: KafkaConfig,
    template: TopicTemplate,
    known_topics: HashSet<String>,
    /// The previous event's topic and what it was derived from: consecutive
    /// events usually share it, and rendering, validating and looking it up
    /// for each one showed up in the relay's profile.
    last_topic: Option<TopicChoice>,
    timeout: Duration,
    /// Ends waits for room in librdkafka's buffer (see [`Publisher::stop_on`]).
    stop: CancellationToken,
}

/// A resolved topic, with the fields it was resolved from.
struct TopicChoice {
    aggregate_type: String,
    event_type: String,
    topic_override: Option<String>,
    topic: String,
}

impl TopicChoice {
    fn applies_to(&self, event: &OutboxEvent) -> bool {
        self.topic_override == event.topic
            && self.aggregate_type == event.aggregate_type
            && self.event_type == event.event_type
    }
}

impl Publisher {
    /// Creates the producer. No connection is made yet.
    pub fn new(
        cfg: &KafkaConfig,
        template: TopicTemplate,
        max_in_flight: usize,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let client = producer_config(cfg, max_in_flight);
        let ledger = Ledger::new(metrics);
        let (producer, reports) = make_producer(&client, &ledger, &cfg.options)?;
        let admin: AdminClient<DefaultClientContext> =
            client.create().map_err(|e| Error::Kafka {
                context: "creating the kafka admin client".into(),
                source: Box::new(e),
            })?;
        Ok(Self {
            producer,
            reports,
            client,
            ledger,
            suspects: HashSet::new(),
            condemned: std::collections::HashMap::new(),
            admin,
            cfg: cfg.clone(),
            template,
            known_topics: HashSet::new(),
            last_topic: None,
            timeout,
            stop: CancellationToken::new(),
        })
    }

    /// Waits until the producer holds no record of an earlier session and
    /// every delivery report was served, so that nothing from that session
    /// can reach Kafka after the next one starts resending from the slot.
    /// Refused records found on the way become suspects. Then, if the
    /// producer hit a fatal error, replaces it. Returns `Ok(false)` when
    /// `token` was cancelled first.
    pub async fn drain(&mut self, token: &CancellationToken) -> Result<bool> {
        let started = Instant::now();
        let mut logged = None::<Instant>;
        let mut fatal = None;
        loop {
            // Read on every round: the producer may stop while we wait.
            fatal = self.producer.client().fatal_error().or(fatal);
            if let Some((code, reason)) = &fatal
                && !replaceable(*code)
            {
                // A new producer would stop for the same reason.
                return Err(Error::Kafka {
                    context: format!("the kafka producer stopped for good: {reason}"),
                    source: Box::new(KafkaError::MessageProduction(*code)),
                });
            }
            if self.ledger.unreported() == 0 {
                break;
            }
            if fatal.is_some() {
                // A stopped producer sends nothing more, yet requeues records
                // whose requests failed (batches behind the refused one), and
                // without a message timeout they would wait forever. They
                // were never written: the next session resends them.
                self.producer
                    .purge(rdkafka::producer::PurgeConfig::default().queue());
            }
            if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(30))
                && started.elapsed() >= Duration::from_secs(1)
            {
                tracing::warn!(
                    records = self.ledger.unreported(),
                    waited = ?started.elapsed(),
                    "waiting for kafka to acknowledge the previous session's records before resending from the slot"
                );
                logged = Some(Instant::now());
            }
            tokio::select! {
                biased;
                _ = token.cancelled() => return Ok(false),
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
        for refused in self.ledger.take_all_refused() {
            if let Refused::Record { error, letter, .. } = refused {
                self.suspect(&error, &letter.event_id);
            }
        }
        if let Some(fatal) = fatal {
            tracing::warn!(
                code = ?fatal.0,
                reason = %fatal.1,
                "the kafka producer stopped for good; replacing it"
            );
            let (producer, reports) = make_producer(&self.client, &self.ledger, &self.cfg.options)?;
            // The old one holds nothing (drained above): dropping it loses nothing.
            self.reports = reports;
            self.producer = producer;
        }
        // Topics may have been deleted or created meanwhile: check again.
        self.known_topics.clear();
        self.last_topic = None;
        Ok(true)
    }

    /// Waits for room in librdkafka's buffer end when `token` is cancelled.
    pub fn stop_on(&mut self, token: CancellationToken) {
        self.stop = token;
    }

    /// Notes a refusal of a record that was not sent on its own: unless it
    /// only follows from another record's refusal, its event becomes a
    /// suspect, sent on its own by the next session.
    pub fn suspect(&mut self, error: &Error, event_id: &str) {
        if is_suspect(error) {
            self.suspects.insert(event_id.to_owned());
        }
    }

    /// Notes that Kafka refused `letter`'s event on its own: the next session
    /// sends the dead letter in its place. (It cannot be sent now: the
    /// refusal stopped the producer.)
    pub fn condemn(&mut self, letter: DeadLetter) {
        self.suspects.remove(&letter.event_id);
        self.condemned.insert(letter.event_id.clone(), letter);
    }

    /// The dead letter due instead of this event, if Kafka refused it on its own.
    pub fn take_condemned(&mut self, event_id: &str) -> Option<DeadLetter> {
        if self.condemned.is_empty() {
            return None;
        }
        self.condemned.remove(event_id)
    }

    /// Whether an event was refused in a batch and must be sent on its own.
    pub fn is_suspect(&self, event_id: &str) -> bool {
        !self.suspects.is_empty() && self.suspects.contains(event_id)
    }

    /// Marks an event as no longer suspect (it was sent on its own).
    pub fn clear_suspect(&mut self, event_id: &str) {
        self.suspects.remove(event_id);
    }

    /// Refusals not acted on (after the final flush): a stop during which
    /// Kafka refused a record does not exit 0.
    pub fn refused_at_exit(&self) -> Option<Error> {
        self.ledger
            .take_all_refused()
            .into_iter()
            .find_map(|r| match r {
                Refused::Record { error, .. } if error.is_refusal() => Some(error),
                Refused::Fatal(error) if error.is_refusal() => Some(error),
                _ => None,
            })
    }

    /// Records handed to the producer without a delivery report served yet.
    pub fn in_flight(&self) -> usize {
        self.ledger.unreported() as usize
    }

    /// Fails with a clear error when no broker answers within the timeout.
    pub async fn check_brokers(&self) -> Result<()> {
        let producer = self.producer.clone();
        let timeout = self.timeout;
        let result = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(None, timeout).map(|_| ())
        })
        .await
        .expect("metadata lookup does not panic");
        result.map_err(|source| Error::BrokersUnreachable {
            brokers: self.cfg.brokers.clone(),
            source: Box::new(source),
        })
    }

    /// The topic an event goes to.
    pub fn topic_for(&self, event: &OutboxEvent) -> Result<String> {
        let topic = match &event.topic {
            Some(t) => t.clone(),
            None => self
                .template
                .render(&event.aggregate_type, &event.event_type),
        };
        outbox::topic::validate(&topic).map_err(|why| Error::BadEvent {
            event_id: event.id.clone(),
            reason: format!(
                "the topic template gives `{topic}`, which is not a legal Kafka topic ({why}); \
                 fix its aggregate_type or event_type, or change --topic-template"
            ),
        })?;
        Ok(topic)
    }

    /// Makes sure a topic exists, creating it when allowed. Checked once per
    /// topic and process, because producing to a missing topic only fails after
    /// a long timeout with an error that does not name the topic.
    /// `needed_by` says what needs it, for the error: `event <id>` or the
    /// dead-letter setting.
    pub async fn ensure_topic(&mut self, topic: &str, needed_by: &str) -> Result<()> {
        if self.known_topics.contains(topic) {
            return Ok(());
        }
        if !self.topic_exists(topic).await? {
            if !self.cfg.create_topics {
                return Err(Error::TopicMissing {
                    topic: topic.to_owned(),
                    needed_by: needed_by.to_owned(),
                });
            }
            self.create_topic(topic).await?;
        }
        self.known_topics.insert(topic.to_owned());
        Ok(())
    }

    async fn topic_exists(&self, topic: &str) -> Result<bool> {
        Ok(self.topic_partitions(topic).await? > 0)
    }

    /// How many partitions the topic has (0: it does not exist).
    async fn topic_partitions(&self, topic: &str) -> Result<usize> {
        let producer = self.producer.clone();
        let timeout = self.timeout;
        let name = topic.to_owned();
        let metadata = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(Some(&name), timeout)
        })
        .await
        .expect("metadata lookup does not panic")
        .map_err(|source| Error::Kafka {
            context: format!("looking up kafka topic `{topic}`"),
            source: Box::new(source),
        })?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len()))
    }

    async fn create_topic(&self, topic: &str) -> Result<()> {
        // -1: the broker's defaults (num.partitions, default.replication.factor).
        let new = NewTopic::new(
            topic,
            self.cfg.topic_partitions.unwrap_or(-1),
            TopicReplication::Fixed(self.cfg.topic_replication_factor.unwrap_or(-1)),
        );
        let opts = AdminOptions::new().operation_timeout(Some(self.timeout));
        let results = self
            .admin
            .create_topics([&new], &opts)
            .await
            .map_err(|source| Error::Kafka {
                context: format!("creating kafka topic `{topic}`"),
                source: Box::new(source),
            })?;
        let mut created = false;
        for result in results {
            match result {
                Ok(_) => created = true,
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(Error::Kafka {
                        context: format!("creating kafka topic `{topic}`"),
                        source: Box::new(KafkaError::AdminOp(code)),
                    });
                }
            }
        }
        // Wait until the new topic shows up in metadata, so the first records
        // are not held back by librdkafka's unknown-topic handling.
        let deadline = tokio::time::Instant::now() + self.timeout;
        let partitions = loop {
            let n = self.topic_partitions(topic).await?;
            if n > 0 {
                break n;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Kafka {
                    context: format!(
                        "kafka topic `{topic}` was created but does not appear in metadata"
                    ),
                    source: Box::new(KafkaError::AdminOp(RDKafkaErrorCode::RequestTimedOut)),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if created {
            tracing::info!(
                topic,
                partitions,
                replication_factor = %self
                    .cfg
                    .topic_replication_factor
                    .map_or("broker default".to_owned(), |r| r.to_string()),
                "created kafka topic (--create-topics)"
            );
        }
        Ok(())
    }

    /// The ledger delivery reports settle tickets in.
    pub fn ledger(&self) -> Arc<Ledger> {
        self.ledger.clone()
    }

    /// Hands one event to the producer with its `ticket`: key = aggregate
    /// id, value = payload, headers = id, event_type, aggregate_type,
    /// aggregate_id, traceparent and the row's own headers. The delivery
    /// report settles the ticket in the ledger.
    pub async fn send(&mut self, event: &OutboxEvent, ticket: Ticket) -> Result<()> {
        if !self
            .last_topic
            .as_ref()
            .is_some_and(|c| c.applies_to(event))
        {
            let topic = self.topic_for(event)?;
            self.ensure_topic(&topic, &format!("event {}", event.id))
                .await?;
            self.last_topic = Some(TopicChoice {
                aggregate_type: event.aggregate_type.clone(),
                event_type: event.event_type.clone(),
                topic_override: event.topic.clone(),
                topic,
            });
        }
        let topic = &self.last_topic.as_ref().expect("resolved above").topic;
        let headers = event.record_headers().fold(
            OwnedHeaders::new_with_capacity(5 + event.headers.len()),
            |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value),
                })
            },
        );
        let record = BaseRecord::with_opaque_to(topic, ticket.into_opaque())
            .key(event.aggregate_id.as_bytes())
            .payload(&event.payload[..])
            .headers(headers);
        send_with_backpressure(&self.producer, record, &event.id, &self.stop).await
    }

    /// Hands a dead letter to the producer for `topic` with the refused
    /// record's ticket: the original key, value and headers, plus
    /// `outbox.error` (the reason) and `outbox.original_topic`.
    pub async fn send_dead_letter(
        &self,
        topic: &str,
        letter: &DeadLetter,
        ticket: Ticket,
    ) -> Result<()> {
        tracing::warn!(
            event_id = %letter.event_id,
            topic = %topic,
            reason = %letter.reason,
            "event is undeliverable; sending it to the dead-letter topic"
        );
        let mut headers = OwnedHeaders::new_with_capacity(letter.headers.len() + 2);
        for (k, v) in &letter.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
        headers = headers.insert(Header {
            key: "outbox.error",
            value: Some(letter.reason.as_bytes()),
        });
        if let Some(t) = &letter.original_topic {
            headers = headers.insert(Header {
                key: "outbox.original_topic",
                value: Some(t.as_bytes()),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(topic, ticket.for_dead_letter().into_opaque())
                .headers(headers);
        if let Some(k) = &letter.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &letter.value {
            record = record.payload(v.as_slice());
        }
        send_with_backpressure(&self.producer, record, &letter.event_id, &self.stop)
            .await
            .map_err(|err| Error::DeadLetterFailed {
                event_id: letter.event_id.clone(),
                reason: letter.reason.clone(),
                source: Box::new(err),
            })
    }

    /// Waits until everything handed to the producer is acknowledged or failed.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .expect("flush does not panic")
            .map_err(|source| Error::Kafka {
                context: "flushing the kafka producer".into(),
                source: Box::new(source),
            })
    }
}

/// The producer's settings: the relay's delivery settings, then the user's
/// `--kafka-option`s (which cannot weaken them: see `config`).
fn producer_config(cfg: &KafkaConfig, max_in_flight: usize) -> ClientConfig {
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
        // 1 ms, not librdkafka's 5: at 1,000 events/s it cut p50
        // commit-to-ack from 7 to 3 ms (0 ms: 1 ms, but more CPU per
        // event at 5,000/s); under a backlog batches fill regardless.
        .set("linger.ms", "1")
        // Bound librdkafka's own buffer; the relay's window bounds the rest.
        .set("queue.buffering.max.kbytes", "32768")
        .set(
            "queue.buffering.max.messages",
            (max_in_flight + 1024).max(10_000).to_string(),
        );
    for (k, v) in &cfg.options {
        client.set(k, v);
    }
    client
}

/// Creates a producer settling tickets in `ledger`, and starts serving its
/// delivery reports.
fn make_producer(
    client: &ClientConfig,
    ledger: &Arc<Ledger>,
    options: &[(String, String)],
) -> Result<(Arc<Producer>, ReportServer)> {
    let producer: Producer = client
        .create_with_context(Deliveries::new(ledger.clone()))
        .map_err(|e| {
            Error::Config(format!(
                "the kafka producer settings are refused: {}",
                redact_config_error(&e, options)
            ))
        })?;
    let producer = Arc::new(producer);
    let reports = ReportServer::start(producer.clone())?;
    Ok((producer, reports))
}

/// Whether a producer that stopped with this error is replaced (and the
/// session resent), rather than the relay stopping: yes for errors tied to
/// the stopped producer's id and sequence numbers, which a new producer does
/// not inherit; no for authorization, authentication and version errors,
/// which would stop every new producer too.
fn replaceable(code: RDKafkaErrorCode) -> bool {
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

/// Whether a refusal in a delivery report makes its record a suspect: any
/// refusal except those that only follow from another record's (a purged
/// queue, the producer's fatal error).
fn is_suspect(error: &Error) -> bool {
    match error {
        Error::Delivery { source, .. } => !matches!(
            **source,
            KafkaError::MessageProduction(
                RDKafkaErrorCode::PurgeQueue
                    | RDKafkaErrorCode::PurgeInflight
                    | RDKafkaErrorCode::Fatal
            )
        ),
        _ => false,
    }
}

/// librdkafka echoes the offending value in configuration errors; replace any
/// option value (which may be a password) before it reaches a log.
fn redact_config_error(err: &KafkaError, options: &[(String, String)]) -> String {
    let mut text = err.to_string();
    for (_, v) in options {
        if v.len() >= 3 {
            text = text.replace(v.as_str(), "[redacted]");
        }
    }
    text
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

    #[test]
    fn redacts_option_values_in_errors() {
        // librdkafka echoes an invalid value in its message: provoke that.
        let err = ClientConfig::new()
            .set("linger.ms", "hunter2-not-a-number")
            .create::<rdkafka::producer::BaseProducer>()
            .err()
            .expect("an invalid value is refused");
        assert!(err.to_string().contains("hunter2"), "{err}");
        let text =
            redact_config_error(&err, &[("linger.ms".into(), "hunter2-not-a-number".into())]);
        assert!(!text.contains("hunter2"), "{text}");
    }
}
