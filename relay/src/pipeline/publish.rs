//! Publishing events: topic resolution (per-row override or template),
//! record layout (key, value, headers), dead letters, the events to send on
//! their own after a refused batch, and replacing a producer that stopped.
//! The producer itself, its reports and topic checks are `kafka`'s.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer as _};
use tokio_util::sync::CancellationToken;

use crate::kafka::config::KafkaConfig;
use crate::kafka::producer::{self, producer_config, replaceable};
use crate::kafka::reports::ReportServer;
use crate::kafka::topics::Topics;
use crate::metrics::Metrics;
use crate::pipeline::dead_letter::DeadLetter;
use crate::pipeline::deliveries::{Deliveries, Producer};
use crate::pipeline::event::{OutboxEvent, printable};
use crate::pipeline::progress::{Ledger, Refused, Ticket};
use crate::pipeline::shutdown::Grace;
use crate::pipeline::topic::{AllowedTopics, TopicTemplate};
use crate::{Error, Result};

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
    topics: Topics,
    cfg: KafkaConfig,
    template: TopicTemplate,
    allowed: AllowedTopics,
    /// The previous event's topic and what it was derived from: consecutive
    /// events usually share it, and rendering, validating and looking it up
    /// for each one showed up in the relay's profile.
    last_topic: Option<TopicChoice>,
    timeout: Duration,
    /// The stop's time budget: waits for room in librdkafka's buffer end at
    /// its hand-over, and waits for acknowledgements while stopping take
    /// what is left of it.
    grace: Grace,
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
        allowed: AllowedTopics,
        max_in_flight: usize,
        timeout: Duration,
        grace: Grace,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let client = producer_config(cfg, max_in_flight);
        let ledger = Ledger::new(metrics);
        let (producer, reports) =
            producer::create(&client, Deliveries::new(ledger.clone()), &cfg.options)?;
        let topics = Topics::new(&client, cfg, timeout)?;
        Ok(Self {
            producer,
            reports,
            client,
            ledger,
            suspects: HashSet::new(),
            condemned: std::collections::HashMap::new(),
            topics,
            cfg: cfg.clone(),
            template,
            allowed,
            last_topic: None,
            timeout,
            grace,
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
            let (producer, reports) = producer::create(
                &self.client,
                Deliveries::new(self.ledger.clone()),
                &self.cfg.options,
            )?;
            // The old one holds nothing (drained above): dropping it loses nothing.
            self.reports = reports;
            self.producer = producer;
        }
        // Topics may have been deleted or created meanwhile: check again.
        self.topics.forget();
        self.last_topic = None;
        Ok(true)
    }

    /// The stop's time budget.
    pub fn grace(&self) -> &Grace {
        &self.grace
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
        producer::check_brokers(
            &self.producer,
            self.producer.context().client_errors(),
            &self.cfg.brokers,
            self.timeout,
        )
        .await
    }

    /// The topic an event asks for (its override, or the template's),
    /// unchecked: for a dead letter's `outbox.original_topic`.
    pub fn requested_topic(&self, event: &OutboxEvent) -> String {
        match &event.topic {
            Some(t) => t.clone(),
            None => self
                .template
                .render(&event.aggregate_type, &event.event_type),
        }
    }

    /// The topic an event goes to: legal, and allowed.
    pub fn topic_for(&self, event: &OutboxEvent) -> Result<String> {
        let topic = self.requested_topic(event);
        outbox::topic::validate(&topic).map_err(|why| Error::BadEvent {
            event_id: event.id.clone(),
            reason: format!(
                "the topic template gives `{}`, which is not a legal Kafka topic ({why}); \
                 fix its aggregate_type or event_type, or change --topic-template",
                printable(&topic)
            ),
        })?;
        // Before the topic is created or written: a row must not reach
        // another service's topic or create topics at will.
        self.allowed
            .check(&topic)
            .map_err(|reason| Error::BadEvent {
                event_id: event.id.clone(),
                reason,
            })?;
        Ok(topic)
    }

    /// Makes sure a topic exists, creating it when allowed (see
    /// [`Topics::ensure`]).
    pub async fn ensure_topic(&mut self, topic: &str, needed_by: &str) -> Result<()> {
        self.topics.ensure(&self.producer, topic, needed_by).await
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
        let headers = event.kafka_headers(0);
        self.ledger
            .charge(ticket, weight(event.key(), &event.payload, &headers));
        let record = BaseRecord::with_opaque_to(topic, ticket.into_opaque())
            .key(event.key())
            .payload(&event.payload[..])
            .headers(headers);
        producer::send(&self.producer, record, &event.id, self.grace.hand_over()).await?;
        self.ledger.handed();
        Ok(())
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
        self.ledger.charge(
            ticket,
            weight(
                letter.key.as_deref().unwrap_or_default(),
                letter.value.as_deref().unwrap_or_default(),
                &headers,
            ),
        );
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(topic, ticket.for_dead_letter().into_opaque())
                .headers(headers);
        if let Some(k) = &letter.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &letter.value {
            record = record.payload(v.as_slice());
        }
        producer::send(
            &self.producer,
            record,
            &letter.event_id,
            self.grace.hand_over(),
        )
        .await
        .map_err(|err| Error::DeadLetterFailed {
            event_id: letter.event_id.clone(),
            reason: letter.reason.clone(),
            source: Box::new(err),
        })?;
        self.ledger.handed();
        Ok(())
    }

    /// Waits until everything handed to the producer is acknowledged or failed.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        producer::flush(&self.producer, timeout).await
    }
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

/// What a record weighs against the in-flight window: its key, value and
/// headers.
fn weight(key: &[u8], value: &[u8], headers: &OwnedHeaders) -> u64 {
    use rdkafka::message::Headers as _;
    let headers: usize = headers
        .iter()
        .map(|x| x.key.len() + x.value.map_or(0, <[u8]>::len))
        .sum();
    (key.len() + value.len() + headers) as u64
}
