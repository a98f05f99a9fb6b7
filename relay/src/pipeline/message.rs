//! Outbox events written as logical decoding messages (`outbox::emit`, the
//! tableless outbox): which messages are the outbox's (their prefix,
//! `--message-prefix`), and turning a message's content into the cells of a
//! virtual outbox row, so the same checks and the same topic, key and header
//! rules apply to it as to a table's rows.

use bytes::Bytes;

use crate::pgoutput::decode::Cell;
use crate::pipeline::dead_letter::DeadLetter;
use crate::pipeline::event::{Layout, OutboxEvent, printable};
use crate::{Error, Result};

/// The relay's view of outbox messages.
#[derive(Debug, Clone)]
pub struct Messages {
    prefix: Bytes,
    layout: Layout,
}

impl Messages {
    /// Messages emitted with `prefix` are outbox events.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: Bytes::copy_from_slice(prefix.as_bytes()),
            layout: Layout::for_messages(prefix),
        }
    }

    /// Whether a message with this prefix is an outbox event. Others (from
    /// other tools sharing the database) are skipped.
    pub fn is_ours(&self, prefix: &[u8]) -> bool {
        prefix == self.prefix
    }

    /// The layout of the virtual rows.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The event a message's content holds, or why it is not one, with
    /// its dead letter in that case (what the content gives, see
    /// [`Layout::dead_letter`]; the raw content as the value when it could
    /// not be read at all). `transactional` is false for a message emitted
    /// outside its transaction, which the outbox refuses: such a message is
    /// decoded even when its transaction rolls back.
    pub fn event(
        &self,
        transactional: bool,
        content: &[u8],
    ) -> (Result<OutboxEvent>, Option<DeadLetter>) {
        let parsed = match outbox::message::Content::decode(content) {
            Ok(parsed) => parsed,
            Err(e) => {
                let err = Error::BadEvent {
                    event_id: "unknown".to_owned(),
                    reason: format!(
                        "one of the {}: {e}; it was not written by outbox::emit",
                        self.layout.table()
                    ),
                };
                let letter = DeadLetter {
                    event_id: "unknown".to_owned(),
                    value: Some(content.to_vec()),
                    reason: err.to_string(),
                    ..DeadLetter::default()
                };
                return (Err(err), Some(letter));
            }
        };
        let text = |s: &str| Cell::Text(Bytes::copy_from_slice(s.as_bytes()));
        let opt = |s: Option<&str>| s.map(text).unwrap_or(Cell::Null);
        // In the order of `event::MESSAGE_COLUMNS`.
        let cells = [
            text(&parsed.id),
            text(&parsed.aggregate_type),
            text(&parsed.aggregate_id),
            text(&parsed.event_type),
            text(parsed.payload.get()),
            opt(parsed.headers.map(|h| h.get())),
            opt(parsed.topic.as_deref()),
            opt(parsed.trace_context.as_deref()),
        ];
        let event = if outbox::EventId::parse(&parsed.id).is_err() {
            // The table's `uuid` column enforces this for rows; consumers
            // (outbox::Envelope, inboxes) deduplicate on a UUID.
            Err(Error::BadEvent {
                event_id: printable(&parsed.id).into_owned(),
                reason: format!(
                    "it is one of the {} but its `id` is not a UUID; outbox::emit writes UUIDv7 ids",
                    self.layout.table()
                ),
            })
        } else if transactional {
            self.layout.event(&cells)
        } else {
            Err(Error::BadEvent {
                event_id: printable(&parsed.id).into_owned(),
                reason: format!(
                    "it is one of the {} but was emitted with transactional = false, so it is not part \
                     of its transaction's commit (it is sent even when that transaction rolls back); emit \
                     outbox events with pg_logical_emit_message(true, ...), as outbox::emit does",
                    self.layout.table()
                ),
            })
        };
        // Made only for a message that is not an event (the rare case).
        let letter = event
            .as_ref()
            .err()
            .map(|err| self.layout.dead_letter(&cells, err));
        (event, letter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_becomes_the_same_event_as_a_row() {
        let m = Messages::new("outbox");
        assert!(m.is_ours(b"outbox"));
        assert!(!m.is_ours(b"outbox2"));
        assert!(!m.is_ours(b"other"));
        let event = outbox::Event::new("order", "42", "Placed", &serde_json::json!({"n": 1}))
            .unwrap()
            .with_header("tenant", "acme")
            .unwrap();
        let content = outbox::message::Content::encode(&event);
        let (ev, letter) = m.event(true, &content);
        let ev = ev.unwrap();
        assert!(letter.is_none());
        assert_eq!(ev.id, event.id().to_string());
        assert_eq!(ev.aggregate_type, "order");
        assert_eq!(ev.aggregate_id, "42");
        assert_eq!(ev.event_type, "Placed");
        assert_eq!(&ev.payload[..], br#"{"n":1}"#);
        assert_eq!(ev.headers, vec![("tenant".to_owned(), "acme".to_owned())]);
        assert_eq!(ev.topic, None);
    }

    #[test]
    fn bad_messages_are_named_and_dead_lettered() {
        let m = Messages::new("outbox");
        let (err, letter) = m.event(true, b"hello");
        let err = err.unwrap_err();
        assert!(err.is_undeliverable());
        assert!(err.to_string().contains("event unknown"), "{err}");
        assert!(err.to_string().contains("not an outbox event"), "{err}");
        assert_eq!(letter.unwrap().value.as_deref(), Some(&b"hello"[..]));

        let content = br#"{"v":1,"id":"01a208c7-0cb3-7158-aba7-278fd39b5166","aggregate_type":"o","aggregate_id":"1","event_type":"t","payload":{}}"#;
        let (err, letter) = m.event(false, content);
        let err = err.unwrap_err();
        let id = "01a208c7-0cb3-7158-aba7-278fd39b5166";
        assert!(err.to_string().contains(id), "{err}");
        assert!(err.to_string().contains("transactional = false"), "{err}");
        let letter = letter.unwrap();
        assert_eq!(letter.event_id, id);
        assert!(
            letter
                .headers
                .iter()
                .any(|(k, v)| k == "id" && v == id.as_bytes())
        );
        // An id that is not a UUID, as the table's column would refuse it.
        let (err, _) = m.event(true, br#"{"v":1,"id":"e-1","aggregate_type":"o","aggregate_id":"1","event_type":"t","payload":{}}"#);
        assert!(err.unwrap_err().to_string().contains("not a UUID"));

        // Readable content, but one the row checks refuse: same rules as a table.
        let spoof = br#"{"v":1,"id":"01a208c7-0cb3-7158-aba7-278fd39b5167","aggregate_type":"o","aggregate_id":"1","event_type":"t","payload":{},"headers":{"id":"x"}}"#;
        let (err, letter) = m.event(true, spoof);
        let err = err.unwrap_err();
        assert!(err.to_string().contains("sets itself"), "{err}");
        assert!(err.to_string().contains("5167"), "{err}");
        let letter = letter.unwrap();
        assert_eq!(letter.key.as_deref(), Some(&b"1"[..]));
    }
}
