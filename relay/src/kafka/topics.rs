//! Kafka topics: checking that a topic exists before the first record goes
//! to it, and creating it (`--create-topics`) when it does not.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, ProducerContext};

use crate::kafka::config::KafkaConfig;
use crate::kafka::producer;
use crate::{Error, Result};

/// Which topics are known to exist, and how to create missing ones.
pub struct Topics {
    admin: AdminClient<DefaultClientContext>,
    create: bool,
    partitions: Option<i32>,
    replication_factor: Option<i32>,
    timeout: Duration,
    known: HashSet<String>,
}

impl Topics {
    /// An admin client with the producer's settings; nothing is known yet.
    pub fn new(client: &ClientConfig, cfg: &KafkaConfig, timeout: Duration) -> Result<Self> {
        // librdkafka's refusal quotes the refused value: described without it.
        let admin = client.create().map_err(|e| {
            Error::Config(format!(
                "creating the kafka admin client: {}",
                crate::kafka::config::describe_config_error(&e, &cfg.options)
            ))
        })?;
        Ok(Self {
            admin,
            create: cfg.create_topics,
            partitions: cfg.topic_partitions,
            replication_factor: cfg.topic_replication_factor,
            timeout,
            known: HashSet::new(),
        })
    }

    /// Forgets what is known: topics may have been deleted or created since.
    pub fn forget(&mut self) {
        self.known.clear();
    }

    /// Makes sure a topic exists, creating it when allowed. Checked once per
    /// topic and process, because producing to a missing topic only fails after
    /// a long timeout with an error that does not name the topic.
    /// `needed_by` says what needs it, for the error: `event <id>` or the
    /// dead-letter setting.
    pub async fn ensure<C: ProducerContext + 'static>(
        &mut self,
        producer: &Arc<BaseProducer<C>>,
        topic: &str,
        needed_by: &str,
    ) -> Result<()> {
        if self.known.contains(topic) {
            return Ok(());
        }
        if partitions(producer, topic, self.timeout).await? == 0 {
            if !self.create {
                return Err(Error::TopicMissing {
                    topic: topic.to_owned(),
                    needed_by: needed_by.to_owned(),
                });
            }
            self.create(producer, topic).await?;
        }
        self.known.insert(topic.to_owned());
        Ok(())
    }

    async fn create<C: ProducerContext + 'static>(
        &self,
        producer: &Arc<BaseProducer<C>>,
        topic: &str,
    ) -> Result<()> {
        // -1: the broker's defaults (num.partitions, default.replication.factor).
        let new = NewTopic::new(
            topic,
            self.partitions.unwrap_or(-1),
            TopicReplication::Fixed(self.replication_factor.unwrap_or(-1)),
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
            // A passing error (no leader yet) is the topic still being set up.
            let n = match partitions(producer, topic, self.timeout).await {
                Err(err) if err.is_retryable() => 0,
                other => other?,
            };
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
                    .replication_factor
                    .map_or("broker default".to_owned(), |r| r.to_string()),
                "created kafka topic (--create-topics)"
            );
        }
        Ok(())
    }
}

/// How many partitions the topic has (0: it does not exist).
async fn partitions<C: ProducerContext + 'static>(
    producer: &Arc<BaseProducer<C>>,
    topic: &str,
    timeout: Duration,
) -> Result<usize> {
    let metadata = producer::metadata(producer, Some(topic), timeout)
        .await
        .map_err(|source| Error::Kafka {
            context: format!("looking up kafka topic `{topic}`"),
            source: Box::new(source),
        })?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(0);
    };
    partition_count(
        found.error().map(RDKafkaErrorCode::from),
        found.partitions().len(),
    )
    .map_err(|code| Error::Kafka {
        context: format!("looking up kafka topic `{topic}`"),
        source: Box::new(KafkaError::MetadataFetch(code)),
    })
}

/// A topic's partitions from its metadata entry. Why not "any error means
/// missing": a broker answers LEADER_NOT_AVAILABLE for a topic it is still
/// creating or electing a leader for, and a missing topic stops the relay
/// (without `--create-topics`), while a passing error is retried.
fn partition_count(
    error: Option<RDKafkaErrorCode>,
    partitions: usize,
) -> std::result::Result<usize, RDKafkaErrorCode> {
    match error {
        None => Ok(partitions),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => Ok(0),
        Some(code) => Err(code),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unknown_topic_counts_as_missing() {
        assert_eq!(partition_count(None, 3), Ok(3));
        assert_eq!(
            partition_count(Some(RDKafkaErrorCode::UnknownTopicOrPartition), 0),
            Ok(0)
        );
        let passing = partition_count(Some(RDKafkaErrorCode::LeaderNotAvailable), 0).unwrap_err();
        assert!(
            Error::Kafka {
                context: "x".into(),
                source: Box::new(KafkaError::MetadataFetch(passing)),
            }
            .is_retryable()
        );
        let denied =
            partition_count(Some(RDKafkaErrorCode::TopicAuthorizationFailed), 0).unwrap_err();
        assert!(
            !Error::Kafka {
                context: "x".into(),
                source: Box::new(KafkaError::MetadataFetch(denied)),
            }
            .is_retryable()
        );
    }
}
