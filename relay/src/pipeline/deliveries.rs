//! The pipeline's side of Kafka's delivery reports: the producer context
//! that turns each report into a settled ticket (or a refusal) in the
//! [`Ledger`]. `kafka::reports` serves the reports on the relay's runtime.

use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, DeliveryResult, ProducerContext};

use crate::Error;
use crate::kafka::producer::ClientErrors;
use crate::pipeline::dead_letter::DeadLetter;
use crate::pipeline::progress::{Ledger, Refused, Ticket};

/// The relay's producer: delivery reports go to the ledger.
pub type Producer = BaseProducer<Deliveries>;

/// The producer's context: routes delivery reports to the ledger.
pub struct Deliveries {
    ledger: Arc<Ledger>,
    errors: ClientErrors,
}

impl Deliveries {
    /// A context settling tickets in `ledger`.
    pub fn new(ledger: Arc<Ledger>) -> Self {
        Self {
            ledger,
            errors: ClientErrors::default(),
        }
    }

    /// What librdkafka last reported about its connections.
    pub fn client_errors(&self) -> &ClientErrors {
        &self.errors
    }

    /// The ledger reports go to.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }
}

impl ClientContext for Deliveries {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.record(&error, reason);
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = usize;

    // Runs once per record, wherever the producer is polled: keep it short.
    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let ticket = Ticket::from_opaque(opaque);
        self.ledger.reported();
        match result {
            Ok(message) => {
                if tracing::enabled!(tracing::Level::TRACE) {
                    tracing::trace!(
                        event_id = %header(message, "id").unwrap_or_default(),
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        "delivered"
                    );
                }
                let committed_at = self.ledger.acknowledged(ticket);
                if !ticket.is_dead_letter()
                    && let Some(id) = message
                        .headers()
                        .and_then(|h| h.iter().find(|x| x.key == "id"))
                        .and_then(|x| x.value)
                {
                    self.ledger
                        .note_delivered(ticket, id, message.topic(), committed_at);
                }
            }
            Err((source, message)) => {
                let event_id = header(message, "id").unwrap_or_else(|| "unknown".into());
                let err = Error::Delivery {
                    event_id: event_id.clone(),
                    topic: message.topic().to_owned(),
                    source: Box::new(source.clone()),
                };
                let refusal = if ticket.is_dead_letter() {
                    Refused::Fatal(Error::DeadLetterFailed {
                        event_id,
                        reason: header(message, "outbox.error").unwrap_or_default(),
                        source: Box::new(err),
                    })
                } else {
                    // Whether this record is at fault, or only shares a
                    // refused batch, is decided by the stream.
                    Refused::Record {
                        ticket,
                        letter: DeadLetter::from_message(message, &err),
                        error: err,
                    }
                };
                self.ledger.refused(ticket, refusal);
            }
        }
    }
}

/// The value of a record header, as text.
fn header<M: Message>(message: &M, name: &str) -> Option<String> {
    message.headers().and_then(|h| {
        h.iter()
            .find(|x| x.key == name)
            .and_then(|x| x.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}
