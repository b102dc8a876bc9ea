//! Prometheus text scraping for the tests: the API server's `/metrics`
//! (through the admin client) and our own endpoints (plain HTTP/1.1).

use std::collections::BTreeMap;

use kube::Client;

/// One scrape: every sample, keyed by its series text as written
/// (`name{label="v",...}`).
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub samples: BTreeMap<String, f64>,
    pub text: String,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.to_owned(), value.parse::<f64>().ok()?))
            })
            .collect();
        Scrape {
            samples,
            text: text.to_owned(),
        }
    }

    /// The sum of every sample of `name` whose labels include all of `want`.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(series, _)| {
                let (n, labels) = series.split_once('{').unwrap_or((series.as_str(), ""));
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Whether any series of `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples
            .keys()
            .any(|s| s == name || s.starts_with(&format!("{name}{{")))
    }
}

/// The API server's `/metrics`.
pub async fn apiserver(client: &Client) -> Scrape {
    let request = tonic::codegen::http::Request::get("/metrics")
        .body(Vec::new())
        .unwrap();
    Scrape::parse(&client.request_text(request).await.expect("GET /metrics"))
}

/// `GET http://ADDR/metrics` over a plain TCP stream.
pub async fn endpoint(addr: &str) -> Option<Scrape> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| Scrape::parse(body))
}

/// `apiserver_request_total` between two scrapes, for one verb and resource.
pub fn requests_between(before: &Scrape, after: &Scrape, verb: &str, resource: &str) -> f64 {
    let want = [("verb", verb), ("resource", resource)];
    // Only top-level resources: a subresource (status) is its own series.
    let pick = |s: &Scrape| {
        s.samples
            .iter()
            .filter(|(series, _)| {
                series.starts_with("apiserver_request_total{")
                    && want
                        .iter()
                        .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
                    && series.contains("subresource=\"\"")
            })
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    pick(after) - pick(before)
}
