//! Encrypted and authenticated Kafka: the relay and the example consumer
//! over TLS with the broker's certificate verified against a CA file, a
//! certificate that does not verify stopping the relay with the cause named,
//! and SASL SCRAM-SHA-256 (over plaintext and over TLS) with a wrong password
//! refused clearly. The broker is a real Tansu process; Tansu 0.6 does not
//! terminate TLS itself, so a TLS proxy sits in front of it and Tansu
//! advertises the proxy.

use std::time::Duration;

use crate::consumer::Stand;
use crate::support::tls::{TlsTerminator, certificates};
use crate::support::{Tansu, free_port, unique};

/// A Tansu reachable only through TLS: the terminator listens on the port
/// the broker advertises. Returns both and the bootstrap address.
async fn tls_broker(
    certs: &crate::support::tls::Certificates,
    users: &[(&str, &str)],
) -> (Tansu, TlsTerminator, String) {
    let tls_port = free_port();
    let tansu = if users.is_empty() {
        Tansu::start_advertising(tls_port)
    } else {
        Tansu::start_authenticated(users, Some(tls_port))
    };
    let terminator = TlsTerminator::start(tls_port, tansu.port, certs).await;
    (tansu, terminator, format!("127.0.0.1:{tls_port}"))
}

/// Client settings for TLS (`protocol` SSL or SASL_SSL) trusting `ca`.
fn tls_options(protocol: &str, ca: &std::path::Path) -> Vec<String> {
    vec![
        format!("security.protocol={protocol}"),
        format!("ssl.ca.location={}", ca.display()),
    ]
}

/// Runs the kitchen through the relay and the consumer on `stand`: every
/// event applied exactly once (the projection equals the source table).
async fn events_flow(stand: &Stand) {
    let mut relay = stand.relay();
    relay.wait_streaming().await;
    let mut consumer = stand.consumer("stock", None);
    let n = stand.cook(10).await;
    stand.wait_applied(n).await;
    stand.assert_projection_matches().await;
    assert!(consumer.stop().await.success(), "{}", consumer.logs());
    assert!(relay.stop().await.success(), "{}", relay.logs());
}

#[tokio::test]
async fn the_relay_and_the_consumer_talk_tls_to_the_broker_and_verify_it() {
    let dir = std::env::temp_dir().join(unique("outbox-kafka-tls"));
    let certs = certificates(&dir);
    let (tansu, terminator, brokers) = tls_broker(&certs, &[]).await;
    let stand = Stand::with_broker(tansu, brokers, tls_options("SSL", &certs.ca)).await;
    events_flow(&stand).await;
    // Every client connection went through the TLS listener: the broker
    // advertises only the terminator's port.
    assert!(terminator.handshakes() >= 2, "{}", terminator.handshakes());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_broker_certificate_that_does_not_verify_stops_the_relay_with_the_cause() {
    let dir = std::env::temp_dir().join(unique("outbox-kafka-tls"));
    let certs = certificates(&dir);
    // A CA that did not sign the broker's certificate.
    let other = certificates(&dir.join("other"));
    let (tansu, terminator, brokers) = tls_broker(&certs, &[]).await;
    let stand = Stand::with_broker(tansu, brokers, tls_options("SSL", &other.ca)).await;
    let mut relay = stand.relay_builder().spawn();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    // The final error names the cause in librdkafka's words (the relay's own
    // advice names ssl.ca.location anyway), not only a timeout.
    assert!(
        logs.lines()
            .any(|l| l.contains("cannot reach the kafka brokers")
                && l.contains("certificate verify failed")
                && l.contains("broker certificate could not be verified")),
        "{logs}"
    );
    assert_eq!(terminator.handshakes(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

fn scram(user: &str, password: &str) -> Vec<String> {
    vec![
        "sasl.mechanism=SCRAM-SHA-256".into(),
        format!("sasl.username={user}"),
        format!("sasl.password={password}"),
    ]
}

#[tokio::test]
async fn sasl_scram_authenticates_and_a_wrong_password_is_refused_clearly() {
    let password = "correct horse, battery";
    let tansu = Tansu::start_authenticated(&[("relay", password)], None);
    let brokers = tansu.brokers();
    let mut options = vec!["security.protocol=SASL_PLAINTEXT".to_owned()];
    options.extend(scram("relay", password));
    let stand = Stand::with_broker(tansu, brokers.clone(), options).await;
    events_flow(&stand).await;

    // The same broker, a wrong password: a clear error naming SASL, and
    // neither password in the output.
    let wrong = "wrong-password-value";
    let mut relay = crate::support::RelayBuilder::new(&stand.url, &brokers, &unique("slot"))
        .args(["--kafka-option", "security.protocol=SASL_PLAINTEXT"])
        .args(
            scram("relay", wrong)
                .into_iter()
                .flat_map(|o| ["--kafka-option".to_owned(), o]),
        )
        .spawn();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(
        logs.lines()
            .any(|l| l.contains("cannot reach the kafka brokers")
                && l.contains("SASL authentication")),
        "{logs}"
    );
    assert!(!logs.contains(wrong), "{logs}");
    assert!(!logs.contains(password), "{logs}");
}

#[tokio::test]
async fn sasl_ssl_with_scram_delivers_through_tls() {
    let dir = std::env::temp_dir().join(unique("outbox-kafka-tls"));
    let certs = certificates(&dir);
    let (tansu, terminator, brokers) = tls_broker(&certs, &[("relay", "s3cret")]).await;
    let mut options = tls_options("SASL_SSL", &certs.ca);
    options.extend(scram("relay", "s3cret"));
    let stand = Stand::with_broker(tansu, brokers, options).await;
    events_flow(&stand).await;
    assert!(terminator.handshakes() >= 2, "{}", terminator.handshakes());
    let _ = std::fs::remove_dir_all(&dir);
}
