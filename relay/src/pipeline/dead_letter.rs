//! Dead letters: what the relay publishes to the dead-letter topic in place
//! of an event Kafka will not take (or a row that is not a valid event),
//! under `--on-undeliverable dead-letter`.

use rdkafka::message::{Headers, Message};

use crate::Error;

/// An event Kafka will not take (or a row that is not a valid event), to be
/// parked in the dead-letter topic under `--on-undeliverable dead-letter`.
#[derive(Debug, Clone, Default)]
pub struct DeadLetter {
    /// The event id, when known.
    pub event_id: String,
    /// The original record key (aggregate id), when known.
    pub key: Option<Vec<u8>>,
    /// The original value, unless it is the reason (too large).
    pub value: Option<Vec<u8>>,
    /// The original headers, when known.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Where the event was meant to go, when known.
    pub original_topic: Option<String>,
    /// Why it is here.
    pub reason: String,
}

impl DeadLetter {
    /// From a record Kafka refused, as returned in its delivery report.
    pub fn from_message<M: Message>(message: &M, err: &Error) -> Self {
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|x| (x.key.to_owned(), x.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        let event_id = match err {
            Error::Delivery { event_id, .. } => event_id.clone(),
            _ => String::new(),
        };
        Self {
            event_id,
            key: message.key().map(<[u8]>::to_vec),
            value: if err.is_too_large() {
                None
            } else {
                message.payload().map(<[u8]>::to_vec)
            },
            headers,
            original_topic: Some(message.topic().to_owned()),
            reason: err.to_string(),
        }
    }
}
