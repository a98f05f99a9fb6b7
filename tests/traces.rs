//! Issue 12, traces from writer to consumer: the write helper takes the
//! current OpenTelemetry span's W3C context, the relay forwards it and
//! records a span per transaction as its child (exported as JSON lines), and
//! the consumer example continues the trace in its processing span (read
//! back from an in-memory exporter).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::context::FutureExt;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
    TracerProvider,
};
use opentelemetry::{Context, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use outbox::Event;
use outbox_consumer_example::consume::{self, ConsumerConfig};
use outbox_consumer_example::kitchen;
use outbox_consumer_example::projection::{AGGREGATE_TYPE, IngredientRestocked};
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

use crate::consumer::Stand;
use crate::support::kafka::consume;
use crate::support::unique;

const TOPIC: &str = "outbox.event.ingredient";

/// The test binary's global tracer provider (the consumer example takes its
/// tracer from the global one), exporting into memory.
fn spans() -> &'static (SdkTracerProvider, InMemorySpanExporter) {
    static SPANS: OnceLock<(SdkTracerProvider, InMemorySpanExporter)> = OnceLock::new();
    SPANS.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        (provider, exporter)
    })
}

/// The writer's span for one operation, under a caller whose context
/// carried `vendor=abc` as tracestate.
fn writer_span(name: &str) -> Context {
    let (provider, _) = spans();
    let upstream = SpanContext::new(
        TraceId::from_bytes(rand::random::<[u8; 16]>()),
        SpanId::from_bytes(rand::random::<[u8; 8]>()),
        TraceFlags::SAMPLED,
        true,
        TraceState::from_str("vendor=abc").unwrap(),
    );
    let upstream = Context::new().with_remote_span_context(upstream);
    let tracer = provider.tracer("test-writer");
    let span = tracer.start_with_context(name.to_owned(), &upstream);
    upstream.with_span(span)
}

fn ids(cx: &Context) -> (String, String) {
    let span = cx.span();
    let sc = span.span_context();
    (sc.trace_id().to_string(), sc.span_id().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_runs_from_the_writer_through_the_relay_to_the_consumer() {
    let s = Stand::new().await;
    spans();
    let dir = std::env::temp_dir().join(unique("traces"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("relay-spans.jsonl");

    // Before the relay's first start: the seed (8 transactions) outside any
    // span, and one traced change; the backfill publishes them from the table.
    let seeded = kitchen::seed(&s.pool).await.unwrap();
    assert_eq!(seeded.len(), 8);
    // event id -> (trace id, writer span id) of the span it was created in.
    let mut traced: HashMap<String, (String, String)> = HashMap::new();
    let mut untraced: BTreeSet<String> = seeded.iter().map(|w| w.id.to_string()).collect();
    let mut rng = rand::rng();
    let early = writer_span("early order");
    let w = kitchen::step(&s.pool, &mut rng)
        .with_context(early.clone())
        .await
        .unwrap();
    early.span().end();
    traced.insert(w.id.to_string(), ids(&early));

    let mut relay = s
        .relay_builder()
        .args(["--traces-exporter", "console", "--traces-file"])
        .arg(file.to_str().unwrap())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .spawn();
    // Streaming from here: transaction spans.
    relay.wait_log(" streaming ", Duration::from_secs(60)).await;

    // One operation, one span, one transaction each: the event takes the
    // span's context through `Context::current()`, across awaits.
    let mut steps = Vec::new();
    for i in 0..4 {
        let cx = writer_span(&format!("order {i}"));
        let w = kitchen::step(&s.pool, &mut rng)
            .with_context(cx.clone())
            .await
            .unwrap();
        traced.insert(w.id.to_string(), ids(&cx));
        steps.push(ids(&cx));
        cx.span().end();
    }

    // One transaction, events of two operations and a raw SQL row.
    let (a, b) = (writer_span("restock a"), writer_span("restock b"));
    let restock = |q: i32| IngredientRestocked {
        name: "lettuce".into(),
        quantity: q,
        min_stock: 20,
        unit_price_cents: 10,
    };
    let ea = {
        let _g = a.clone().attach();
        Event::new(
            AGGREGATE_TYPE,
            "lettuce",
            "IngredientRestocked",
            &restock(5),
        )
        .unwrap()
    };
    let eb = {
        let _g = b.clone().attach();
        Event::new(
            AGGREGATE_TYPE,
            "lettuce",
            "IngredientRestocked",
            &restock(7),
        )
        .unwrap()
    };
    let raw_id = uuid::Uuid::new_v4();
    let mut tx = s.pool.begin().await.unwrap();
    sqlx::query("UPDATE ingredients SET stock = stock + 12 WHERE name = 'lettuce'")
        .execute(&mut *tx)
        .await
        .unwrap();
    outbox::write(&mut tx, &ea).await.unwrap();
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) \
         VALUES ($1, $2, 'lettuce', 'IngredientRestocked', $3)",
    )
    .bind(raw_id)
    .bind(AGGREGATE_TYPE)
    .bind(serde_json::to_value(restock(0)).unwrap())
    .execute(&mut *tx)
    .await
    .unwrap();
    outbox::write(&mut tx, &eb).await.unwrap();
    tx.commit().await.unwrap();
    a.span().end();
    b.span().end();
    traced.insert(ea.id().to_string(), ids(&a));
    traced.insert(eb.id().to_string(), ids(&b));
    untraced.insert(raw_id.to_string());
    let total = traced.len() + untraced.len();

    // The consumer example, in this process (its spans go to memory).
    let (obs_tx, mut observed) = tokio::sync::mpsc::unbounded_channel();
    let token = CancellationToken::new();
    let cfg = ConsumerConfig {
        brokers: s.brokers.clone(),
        group: unique("traces"),
        topics: vec![TOPIC.into()],
        inbox: "stock".into(),
        options: Vec::new(),
        crash_after_commits: None,
    };
    let consumer = tokio::spawn({
        let (pool, token) = (s.pool.clone(), token.clone());
        async move { consume::run(&cfg, &pool, &token, Some(obs_tx)).await }
    });
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), async {
        while seen.len() < total {
            seen.push(observed.recv().await.expect("consumer running"));
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{} of {total} records consumed\n{}",
            seen.len(),
            relay.logs()
        )
    });
    token.cancel();
    consumer.await.unwrap().unwrap();
    assert!(relay.stop().await.success(), "{}", relay.logs());

    // The records: traceparent and tracestate forwarded as written.
    let records = consume(&s.brokers, &[TOPIC], total, Duration::from_secs(60)).await;
    for r in &records {
        let id = &r.headers["id"];
        match traced.get(id) {
            Some((trace, span)) => {
                assert_eq!(
                    r.headers.get("traceparent"),
                    Some(&format!("00-{trace}-{span}-01"))
                );
                assert_eq!(
                    r.headers.get("tracestate").map(String::as_str),
                    Some("vendor=abc")
                );
            }
            None => {
                assert!(untraced.contains(id), "unexpected record {id}");
                assert!(!r.headers.contains_key("traceparent"), "{r:?}");
            }
        }
    }

    // The consumer continued each writer's trace.
    for o in &seen {
        let id = o.event_id.clone().unwrap();
        if let Some((trace, _)) = traced.get(&id) {
            assert_eq!(o.trace_id.as_ref(), Some(trace), "event {id}");
        }
    }
    let memory = spans().1.get_finished_spans().unwrap();
    let mut processed: BTreeMap<String, usize> = BTreeMap::new();
    for span in memory
        .iter()
        .filter(|s| s.name == format!("process {TOPIC}"))
    {
        let Some(id) = span
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == "messaging.message.id")
            .map(|kv| kv.value.to_string())
        else {
            continue;
        };
        if !traced.contains_key(&id) && !untraced.contains(&id) {
            continue; // another test's
        }
        *processed.entry(id.clone()).or_default() += 1;
        assert_eq!(span.span_kind, SpanKind::Consumer);
        match traced.get(&id) {
            Some((trace, parent)) => {
                assert_eq!(&span.span_context.trace_id().to_string(), trace, "{id}");
                assert_eq!(&span.parent_span_id.to_string(), parent, "{id}");
                assert!(span.parent_span_is_remote);
                assert_eq!(span.span_context.trace_state().header(), "vendor=abc");
            }
            None => assert_eq!(span.parent_span_id, SpanId::INVALID, "{id}: a new root"),
        }
        let outcome = span
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == "outbox.outcome")
            .map(|kv| kv.value.clone());
        assert!(matches!(outcome, Some(Value::String(_))), "{span:?}");
    }
    assert_eq!(processed.len(), total, "one processing span per event");

    // The relay: one span per transaction with trace context (and per
    // traced backfilled row), none for the seed's; linked to every writer
    // span of its transaction, and a child of it when there is one.
    let text = std::fs::read_to_string(&file).unwrap();
    let relay_spans: Vec<Json> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(relay_spans.len(), 6, "{text}");
    let find = |(trace, span): &(String, String)| {
        relay_spans
            .iter()
            .find(|s| s["trace_id"] == *trace.as_str() && s["parent_span_id"] == *span.as_str())
            .unwrap_or_else(|| panic!("no relay span under {trace}/{span}:\n{text}"))
    };
    for step in &steps {
        let span = find(step);
        assert_eq!(span["kind"], "client");
        assert_eq!(span["name"], "outbox-relay transaction");
        assert!(
            span["attributes"]["messaging.batch.message_count"].is_null(),
            "{span}"
        );
        assert_eq!(span["attributes"]["messaging.system"], "kafka");
        assert_eq!(span["attributes"]["messaging.operation.name"], "send");
        assert!(
            span["attributes"]["outbox.commit_lsn"].is_string(),
            "{span}"
        );
        assert_eq!(span["trace_state"], "vendor=abc");
        let (trace, parent) = step;
        assert_eq!(
            span["links"],
            serde_json::json!([{"trace_id": trace, "span_id": parent}])
        );
        let start: u128 = span["start_unix_nano"].as_str().unwrap().parse().unwrap();
        let end: u128 = span["end_unix_nano"].as_str().unwrap().parse().unwrap();
        assert!(start > 0 && end >= start, "{span}");
    }
    let backfilled = find(&ids(&early));
    assert_eq!(backfilled["name"], "outbox-relay backfill");
    assert_eq!(backfilled["trace_state"], "vendor=abc");
    // Two requests in one transaction: a root span linked to both, in
    // the order their events were written.
    let ((at, as_), (bt, bs)) = (ids(&a), ids(&b));
    let links = serde_json::json!([
        {"trace_id": at, "span_id": as_},
        {"trace_id": bt, "span_id": bs},
    ]);
    let mixed = relay_spans
        .iter()
        .find(|s| s["links"] == links)
        .unwrap_or_else(|| panic!("no relay span linked to both writers:\n{text}"));
    assert!(mixed["parent_span_id"].is_null(), "{mixed}");
    assert_eq!(mixed["attributes"]["messaging.batch.message_count"], 3);

    let _ = std::fs::remove_dir_all(&dir);
}
