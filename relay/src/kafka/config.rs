//! Kafka producer settings: the brokers, the user's `--kafka-option`s (refused
//! when they would weaken delivery), and what created topics look like.
//! Option values may be secrets: only their names are ever printed.

use std::fmt;

use crate::{Error, Result};

/// Kafka producer settings.
#[derive(Clone)]
pub struct KafkaConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// Extra librdkafka settings, applied after the relay's defaults.
    pub options: Vec<(String, String)>,
    /// Create missing topics.
    pub create_topics: bool,
    /// Partitions for created topics; `None`: the broker's default.
    pub topic_partitions: Option<i32>,
    /// Replication factor for created topics; `None`: the broker's default.
    pub topic_replication_factor: Option<i32>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Options may hold SASL passwords or key material: print names only.
        let names: Vec<&str> = self.options.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("options", &names)
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication_factor", &self.topic_replication_factor)
            .finish()
    }
}

/// Splits a comma-separated list of options (`--kafka-options`,
/// `OUTBOX_KAFKA_OPTIONS`): a comma starts a new option only when what
/// follows looks like `key=` (letters, digits, `.`, `_`, `-`), so a value
/// with a comma in it (`sasl.password=a,b`) stays whole instead of leaking
/// its tail in an error. Empty pieces (`a=1,,b=2`, a trailing comma) are
/// dropped. `--kafka-option` values are never split.
pub fn split_kafka_options(raw: &str) -> Vec<String> {
    let mut options: Vec<String> = Vec::new();
    for piece in raw.split(',') {
        if piece.trim().is_empty() {
            continue;
        }
        let starts_option = piece.split_once('=').is_some_and(|(key, _)| {
            let key = key.trim();
            !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        });
        match options.last_mut() {
            Some(last) if !starts_option => {
                last.push(',');
                last.push_str(piece);
            }
            _ => options.push(piece.to_owned()),
        }
    }
    options.retain(|o| !o.trim().is_empty());
    options
}

/// Parses one `--kafka-option` (`key=value`), refusing the bootstrap servers
/// (set with `--kafka-brokers`) and settings that weaken delivery.
pub fn parse_kafka_option(option: &str) -> Result<(String, String)> {
    let (key, value) = option.split_once('=').ok_or_else(|| {
        // Nothing of it is echoed: without an `=` there is no telling
        // which part is a key and which a secret.
        Error::Config(format!(
            "a --kafka-option (OUTBOX_KAFKA_OPTIONS) of {} characters has no `=`; write each \
             option as key=value",
            option.chars().count()
        ))
    })?;
    let key = key.trim();
    if key.is_empty() {
        return Err(Error::Config(
            "--kafka-option has an empty key; write key=value".into(),
        ));
    }
    if key == "bootstrap.servers" || key == "metadata.broker.list" {
        return Err(Error::Config(format!(
            "set the brokers with --kafka-brokers, not --kafka-option {key}=..."
        )));
    }
    if let Some(why) = weakens_delivery(key, value.trim()) {
        return Err(Error::Config(format!(
            "--kafka-option {key}={} is refused: {why}",
            value.trim()
        )));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// Producer settings that would break the relay's promise (nothing lost,
/// nothing reordered), and why. The relay sets these itself.
fn weakens_delivery(key: &str, value: &str) -> Option<&'static str> {
    let value = value.to_ascii_lowercase();
    let value = value.as_str();
    match key {
        "partitioner" if value == "random" => Some(
            "a random partitioner spreads one aggregate's events over partitions, so consumers \
             see them out of order; the key (aggregate id) must pick the partition",
        ),
        "enable.idempotence" if value != "true" => Some(
            "without idempotence a retried request can duplicate or reorder records within a partition",
        ),
        "acks" | "request.required.acks" if !matches!(value, "all" | "-1") => Some(
            "only acks=all makes an acknowledged record survive the loss of the partition leader, \
             and the relay confirms WAL positions on acknowledgement",
        ),
        "message.timeout.ms" | "delivery.timeout.ms" if value != "0" => Some(
            "a finite timeout makes librdkafka fail the oldest records during a long outage and \
             send the records behind them first (an aggregate's events reordered); the relay waits \
             without a timeout and reports stalls (--stall-warning)",
        ),
        "enable.gapless.guarantee" if value != "true" => Some(
            "without it, records behind one the broker refused are still sent, ahead of the refused \
             record's place",
        ),
        "retries" | "message.send.max.retries" => Some(
            "limiting retries makes librdkafka give up on records during an outage; the relay \
             retries without limit",
        ),
        "transactional.id" => Some("the relay's producer is idempotent, not transactional"),
        "queue.buffering.max.kbytes" | "queue.buffering.max.messages" => Some(
            "the relay sizes librdkafka's buffer beyond its own window, which stops reading WAL \
             where status updates go on; a smaller buffer would refuse records mid-message and \
             stall the stream: set --max-in-flight-bytes or --max-in-flight instead",
        ),
        "allow.auto.create.topics" if value != "false" => Some(
            "the relay creates missing topics itself with --create-topics (and stops on one \
             without it); the broker's auto-creation would make them with its own defaults",
        ),
        "delivery.report.only.error" if value != "false" => Some(
            "the relay confirms a WAL position only on the delivery report of every record before \
             it; without reports for delivered records it would confirm nothing and stop reading \
             once its window is full",
        ),
        // librdkafka's test settings: `test.mock.num.brokers` replaces the
        // brokers with an in-process mock cluster that acknowledges records
        // nobody will ever read.
        _ if key.starts_with("test.") => Some(
            "librdkafka's test settings (an in-process mock cluster, injected faults) are not for \
             a relay that delivers events",
        ),
        _ => None,
    }
}

/// Setting names whose values are secrets: their values are kept out of
/// every message, however short.
fn is_secret_setting(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "key.pem",
        "sasl.oauthbearer.config",
        "sasl.jaas.config",
    ]
    .iter()
    .any(|s| key.contains(s))
}

/// librdkafka's refusal of the user's settings (`options`), without their
/// values: librdkafka quotes a refused value in its message
/// (`Invalid value "..." for configuration property "..."`), and that value
/// may be a password. A refusal of one setting names the setting; its
/// message is kept only once no option value is left in it.
pub fn describe_config_error(
    err: &rdkafka::error::KafkaError,
    options: &[(String, String)],
) -> String {
    let (named, mut text) = match err {
        rdkafka::error::KafkaError::ClientConfig(_, desc, key, value) => {
            // Quoted, the value is replaced whatever its length.
            let desc = desc.replace(&format!("\"{value}\""), "\"[redacted]\"");
            (Some(key.clone()), desc)
        }
        other => (None, other.to_string()),
    };
    for (key, value) in options {
        if value.is_empty() || !text.contains(value.as_str()) {
            continue;
        }
        if value.len() >= 3 {
            text = text.replace(value.as_str(), "[redacted]");
            continue;
        }
        // A short value (`a`) cannot be cut out of a sentence reliably; the
        // refused setting's or a secret's must not stay in it at all.
        if is_secret_setting(key) || named.as_deref() == Some(key.as_str()) {
            text = "librdkafka's message is withheld because it repeats the value".into();
            break;
        }
    }
    match named {
        Some(key) => format!("librdkafka refuses the setting `{key}`: {text}"),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        assert_eq!(
            parse_kafka_option("linger.ms=5").unwrap(),
            ("linger.ms".into(), "5".into())
        );
        let err = parse_kafka_option("sasl.password").unwrap_err().to_string();
        assert!(err.contains("key=value"));
        let err = parse_kafka_option("bootstrap.servers=x:1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--kafka-brokers"));
    }

    /// Path 9 of issue 9: options that silently weakened the guarantees.
    #[test]
    fn options_that_weaken_delivery_are_refused() {
        for (option, why) in [
            ("enable.idempotence=false", "without idempotence"),
            ("acks=1", "acks=all"),
            ("request.required.acks=0", "acks=all"),
            ("message.timeout.ms=300000", "finite timeout"),
            ("delivery.timeout.ms=1000", "finite timeout"),
            ("enable.gapless.guarantee=false", "refused"),
            ("retries=3", "retries"),
            ("transactional.id=x", "not transactional"),
            ("partitioner=random", "random partitioner"),
            ("delivery.report.only.error=true", "delivery report"),
            ("test.mock.num.brokers=3", "mock cluster"),
            ("allow.auto.create.topics=true", "--create-topics"),
            ("queue.buffering.max.kbytes=1024", "--max-in-flight-bytes"),
            ("queue.buffering.max.messages=10", "--max-in-flight"),
        ] {
            let err = parse_kafka_option(option).unwrap_err().to_string();
            assert!(err.contains(why), "{option}: {err}");
            assert!(err.contains("is refused"), "{option}: {err}");
        }
        for fine in [
            "enable.idempotence=true",
            "enable.idempotence=True",
            "partitioner=murmur2_random",
            "acks=all",
            "acks=-1",
            "message.timeout.ms=0",
            "linger.ms=5",
            "compression.type=zstd",
            "delivery.report.only.error=false",
        ] {
            assert!(parse_kafka_option(fine).is_ok(), "{fine}");
        }
    }

    /// Issue 10, item 10: a comma inside a value no longer splits it, and
    /// an option without `=` is not echoed.
    #[test]
    fn commas_inside_values_stay_and_nothing_is_echoed() {
        assert_eq!(
            split_kafka_options("linger.ms=5,compression.type=zstd"),
            ["linger.ms=5", "compression.type=zstd"]
        );
        assert_eq!(
            split_kafka_options("sasl.password=hunter2,tail,sasl.username=relay"),
            ["sasl.password=hunter2,tail", "sasl.username=relay"]
        );
        assert_eq!(split_kafka_options(""), Vec::<String>::new());
        assert_eq!(
            split_kafka_options("linger.ms=5,,acks=all,"),
            ["linger.ms=5", "acks=all"]
        );
        let err = parse_kafka_option("hunter2-secret")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("key=value"), "{err}");
    }

    #[test]
    fn config_errors_never_carry_an_option_value() {
        use rdkafka::ClientConfig;
        let refuse = |key: &str, value: &str| {
            ClientConfig::new()
                .set(key, value)
                .create::<rdkafka::producer::BaseProducer>()
                .err()
                .expect("an invalid value is refused")
        };
        // librdkafka echoes the value: a long one is cut out...
        let err = refuse("linger.ms", "hunter2-not-a-number");
        assert!(err.to_string().contains("hunter2"), "{err}");
        let options = [("linger.ms".to_owned(), "hunter2-not-a-number".to_owned())];
        let text = describe_config_error(&err, &options);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(
            text.starts_with("librdkafka refuses the setting `linger.ms`"),
            "{text}"
        );
        // ...and so is a short one, quoted or not.
        let err = refuse("linger.ms", "x");
        let text = describe_config_error(&err, &[("linger.ms".into(), "x".into())]);
        assert!(!text.contains("\"x\""), "{text}");
        assert!(text.contains("`linger.ms`"), "{text}");
        let err = refuse("security.protocol", "zz");
        let text = describe_config_error(&err, &[("security.protocol".into(), "zz".into())]);
        assert!(!text.contains("zz"), "{text}");
        // A secret setting's value never stays, whatever librdkafka says.
        let err =
            rdkafka::error::KafkaError::ClientCreation("sasl.password p1 is not accepted".into());
        let text = describe_config_error(&err, &[("sasl.password".into(), "p1".into())]);
        assert!(!text.contains("p1"), "{text}");
    }
}
