//! Where one outbox row goes, shared by the stream and the backfill: to its
//! topic; to the dead-letter topic under `--on-undeliverable dead-letter`
//! when it is not a valid event or Kafka will never take it; or, when Kafka
//! refused it as part of a batch, on its own to learn whether the event
//! itself is at fault. Also what to do when a delivery report refuses a
//! record.

use crate::error::KafkaFault;
use crate::pipeline::dead_letter::DeadLetter;
use crate::pipeline::event::OutboxEvent;
use crate::pipeline::progress::{Progress, Refused, Ticket};
use crate::pipeline::publish::Publisher;
use crate::{Error, Result};

/// Hands one row to the producer with `ticket`: the event, or its dead
/// letter (`salvage` builds it) when the row is not a valid event or the
/// producer refuses it at hand-over and a dead-letter topic is set.
/// Otherwise the error stops the caller, before any later row is sent.
pub async fn publish(
    publisher: &mut Publisher,
    ticket: Ticket,
    dead_letter_topic: Option<&str>,
    event: Result<OutboxEvent>,
    salvage: impl FnOnce(&Error) -> DeadLetter,
) -> Result<()> {
    // A record refused at hand-over (larger than message.max.bytes) was
    // never sent, so it is known to be this record's own fault; so is a row
    // that is not a valid event.
    // An event Kafka refused on its own before (only under the dead-letter
    // policy) is replaced by its dead letter.
    let condemned = match &event {
        Ok(event) => publisher.take_condemned(&event.id),
        Err(_) => None,
    };
    let letter = match (condemned, event) {
        (Some(letter), _) => letter,
        (None, Ok(event)) => match publisher.send(&event, ticket).await {
            Ok(()) => return Ok(()),
            Err(err) if err.is_undeliverable() && dead_letter_topic.is_some() => {
                let topic = Some(publisher.requested_topic(&event));
                event.dead_letter(topic, &err)
            }
            Err(err) => return Err(err),
        },
        (None, Err(err)) if err.is_undeliverable() && dead_letter_topic.is_some() => salvage(&err),
        (None, Err(err)) => return Err(err),
    };
    let topic = dead_letter_topic.expect("dead letters are made only under the dead-letter policy");
    publisher
        .send_dead_letter(topic, &letter, ticket.for_dead_letter())
        .await
}

/// Acts on the oldest refusal a delivery report brought. `isolated` is the
/// ticket of a record sent on its own (nothing else in flight): its refusal
/// is about the record itself, so under the dead-letter policy the next
/// session parks it in its place ([`Error::RefusedAlone`]), otherwise the
/// relay stops naming it. Any other refusal may be a batch-mate's fault:
/// the session ends with [`Error::BatchRefused`], and the next one sends
/// each refused record on its own. Either way the refusal stopped the
/// producer (gapless guarantee), so nothing behind it was sent.
pub fn act_on_refusals(
    progress: &Progress,
    publisher: &mut Publisher,
    dead_letter_topic: Option<&str>,
    isolated: Option<Ticket>,
) -> Result<()> {
    if let Some(refused) = progress.take_refused() {
        match refused {
            Refused::Fatal(err) => return Err(err),
            Refused::Record {
                ticket,
                error,
                letter,
            } if Some(ticket) == isolated => match (error.is_undeliverable(), dead_letter_topic) {
                // The refusal stopped the producer (gapless guarantee), so
                // the dead letter goes out from the next session, in the
                // event's place.
                (true, Some(_)) => {
                    let event_id = letter.event_id.clone();
                    publisher.condemn(letter);
                    return Err(Error::RefusedAlone {
                        event_id,
                        source: Box::new(error),
                    });
                }
                _ => return Err(error),
            },
            Refused::Record { error, letter, .. } => {
                publisher.suspect(&error, &letter.event_id);
                return Err(batch_refused(error));
            }
        }
    }
    Ok(())
}

/// A refusal of a record that was not sent alone.
fn batch_refused(error: Error) -> Error {
    match error {
        Error::Delivery {
            event_id,
            topic,
            source,
        } if matches!(
            crate::error::kafka_fault(&source),
            KafkaFault::Record | KafkaFault::Fatal
        ) =>
        {
            Error::BatchRefused {
                event_id,
                topic,
                source,
            }
        }
        // A topic that is gone is checked again by the next session; a
        // record purged because another one stopped the producer is only
        // resent (the error names the cause when the producer is replaced).
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};

    fn delivery(code: C) -> Error {
        Error::Delivery {
            event_id: "e1".into(),
            topic: "t".into(),
            source: Box::new(KafkaError::MessageProduction(code)),
        }
    }

    #[test]
    fn a_refusal_in_a_batch_is_retried_not_parked() {
        for code in [C::MessageSizeTooLarge, C::InvalidRecord, C::InvalidRequest] {
            let err = batch_refused(delivery(code));
            assert!(matches!(err, Error::BatchRefused { .. }), "{code:?}: {err}");
            assert!(err.is_retryable());
            assert!(!err.is_undeliverable(), "never dead-lettered from a batch");
        }
        let err = batch_refused(delivery(C::UnknownTopicOrPartition));
        assert!(matches!(err, Error::Delivery { .. }), "{err}");
        assert!(err.is_retryable(), "the topic is checked again");
        // Collateral of another record's refusal: resent, not a suspect.
        let err = batch_refused(delivery(C::PurgeQueue));
        assert!(matches!(err, Error::Delivery { .. }), "{err}");
        assert!(err.is_retryable());
        assert!(!err.is_refusal());
    }
}
