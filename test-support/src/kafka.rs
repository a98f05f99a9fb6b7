//! Reading back what the relay published: every partition of the given
//! topics from the beginning, with keys, values and headers.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};

/// One record as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<Vec<u8>>,
    pub headers: BTreeMap<String, String>,
    /// Every header name in the order received, repeats included
    /// (`headers` keeps only the last value of a repeated name).
    pub header_names: Vec<String>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn id(&self) -> &str {
        self.header("id").expect("every record has an id header")
    }

    pub fn value_json(&self) -> serde_json::Value {
        serde_json::from_slice(self.value.as_deref().expect("a value")).expect("value is JSON")
    }
}

/// Waits until the topics exist, then reads every partition from the start
/// until at least `expected` records arrived (or `timeout` passed), and then
/// keeps reading for `settle` to catch records beyond the expected ones
/// (duplicates). Returns everything read, in per-partition order.
pub async fn consume(
    brokers: &str,
    topics: &[&str],
    expected: usize,
    timeout: Duration,
) -> Vec<Record> {
    consume_settle(
        brokers,
        topics,
        expected,
        timeout,
        Duration::from_millis(1500),
    )
    .await
}

/// [`consume`] with an explicit settle time.
pub async fn consume_settle(
    brokers: &str,
    topics: &[&str],
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<Record> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", crate::unique("test-reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let deadline = Instant::now() + timeout;
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let partitions = loop {
            let md = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .expect("metadata");
            let parts: Vec<i32> = md
                .topics()
                .iter()
                .filter(|t| t.name() == *topic && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if !parts.is_empty() {
                break parts;
            }
            assert!(Instant::now() < deadline, "topic {topic} never appeared");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        for p in partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("add partition");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut records = Vec::new();
    let mut settle_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let until = match settle_until {
            Some(s) => s,
            None if records.len() >= expected => {
                let s = now + settle;
                settle_until = Some(s);
                s
            }
            None => deadline,
        };
        if now >= until {
            break;
        }
        match tokio::time::timeout(until - now, consumer.recv()).await {
            Err(_) => continue,
            Ok(Err(e)) => panic!("consumer error: {e}"),
            Ok(Ok(m)) => {
                let mut headers = BTreeMap::new();
                let mut header_names = Vec::new();
                if let Some(h) = m.headers() {
                    for header in h.iter() {
                        header_names.push(header.key.to_owned());
                        headers.insert(
                            header.key.to_owned(),
                            String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                records.push(Record {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers,
                    header_names,
                });
            }
        }
    }
    records
}

fn admin(brokers: &str) -> rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client")
}

/// Creates a topic (the relay runs without `--create-topics` in tests that
/// need a topic to be missing first).
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
    let results = admin(brokers)
        .create_topics(
            [&NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e:?}"));
    }
}

/// The names of every topic the cluster has (a full metadata request, so
/// asking cannot create one).
pub fn topic_names(brokers: &str) -> Vec<String> {
    let probe: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", crate::unique("test-metadata"))
        .create()
        .expect("consumer");
    probe
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata")
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .collect()
}

/// Reads every partition of the topics from the start to its high watermark
/// as of this call, then for two more seconds: with the producer stopped the
/// log no longer changes, so duplicates cannot hide behind a settle time
/// that ended while the relay was still sending.
pub async fn consume_to_end(brokers: &str, topics: &[&str]) -> Vec<Record> {
    let probe: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", crate::unique("test-watermarks"))
        .create()
        .expect("consumer");
    let mut total = 0usize;
    let mut partitions = 0usize;
    for topic in topics {
        let md = probe
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        for t in md.topics().iter().filter(|t| t.name() == *topic) {
            for p in t.partitions() {
                let (low, high) = probe
                    .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                    .expect("watermarks");
                total += (high - low).max(0) as usize;
                partitions += 1;
            }
        }
    }
    // Brokers differ on whether the high watermark is the next offset or the
    // last one, so the count is a floor; the settle reads what remains.
    consume_settle(
        brokers,
        topics,
        total.saturating_sub(partitions),
        Duration::from_secs(120),
        Duration::from_secs(2),
    )
    .await
}
