//! Reading the relay's metrics endpoint: one scrape, one value, one
//! histogram. The benchmark computes its percentiles from the same reads.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP answer, as far as the tests look at it.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The `content-type` header, when sent.
    pub content_type: Option<String>,
    /// The body.
    pub body: String,
}

/// `GET path` on `127.0.0.1:port` (HTTP/1.1, `connection: close`, so the
/// server ends the response by closing).
pub async fn get(port: u16, path: &str) -> std::io::Result<Response> {
    let read = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: outbox-test\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut response = String::new();
        s.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "GET timed out"))??;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head}")))?;
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_owned());
    Ok(Response {
        status,
        content_type,
        body: body.to_owned(),
    })
}

/// `GET /metrics`: the body, or the error (connection refused before the
/// relay listens, a timeout, a status other than 200).
pub async fn scrape(port: u16) -> std::io::Result<String> {
    let response = get(port, "/metrics").await?;
    if response.status != 200 {
        return Err(std::io::Error::other(format!(
            "GET /metrics answered {}",
            response.status
        )));
    }
    Ok(response.body)
}

/// The value of an unlabelled series, e.g. `outbox_relay_events_delivered_total`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A histogram's buckets: (upper bound in seconds, cumulative count).
pub fn histogram(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|l| {
            let (bound, rest) = l.split_once("\"}")?;
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().ok()?
            };
            Some((bound, rest.trim().parse().ok()?))
        })
        .collect()
}

/// Waits until `GET /readyz` on `port` answers 200.
pub async fn wait_ready(port: u16, what: &str, timeout: std::time::Duration) {
    crate::wait_for(what, timeout, || async {
        let r = get(port, "/readyz").await.ok()?;
        (r.status == 200).then_some(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_values_and_buckets() {
        let text =
            "# TYPE x counter\nx_total 3\nh_bucket{le=\"0.001\"} 2\nh_bucket{le=\"+Inf\"} 5\n";
        assert_eq!(metric(text, "x_total"), Some(3.0));
        assert_eq!(metric(text, "x"), None);
        assert_eq!(
            histogram(text, "h"),
            vec![(0.001, 2.0), (f64::INFINITY, 5.0)]
        );
    }
}
