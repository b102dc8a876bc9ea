//! Delivery mode `proxy`: what the sidecar costs (issue #12).
//!
//! ```text
//! cargo build --release --bin scopehold --example bench_proxy
//! target/release/examples/bench_proxy [--requests 3000 --connections 300 --concurrency 16 --seconds 5]
//! ```
//!
//! A real HTTPS upstream on loopback (a test CA of its own) and the real
//! `scopehold proxy` binary (`--scopehold PATH`, default beside this example)
//! with one header-template grant for the upstream. A Rust client (hyper +
//! rustls, the same as tests/proxy.rs) measures, each time straight to the
//! upstream and through the sidecar:
//! - latency per request on one kept-alive connection (p50/p90/p99/max);
//! - latency of a new TLS connection plus one request (through the proxy
//!   that is CONNECT, the agent-side handshake with a minted leaf, the
//!   upstream handshake, the request);
//! - requests/s with `--concurrency` kept-alive connections for `--seconds`;
//! - the sidecar's RSS and peak RSS afterwards (every request also wrote
//!   its audit line);
//! - rotation and revocation: from the file change in the values volume to
//!   the first request carrying the new value / refused with 403 (requests
//!   every 2 ms on a kept-alive connection).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/proxy_support/mod.rs"]
mod proxy_support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use proxy_support::{RustClient, Sidecar, put_value, test_pki, upstream};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Sequential requests on one kept-alive connection, per path.
    #[arg(long, default_value_t = 3000)]
    requests: usize,
    /// New connections (one request each), per path.
    #[arg(long, default_value_t = 300)]
    connections: usize,
    /// Kept-alive connections in the throughput run.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Length of the throughput run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rotation and revocation events.
    #[arg(long, default_value_t = 20)]
    events: usize,
    /// The `scopehold` binary.
    #[arg(long, env = "SCOPEHOLD_BIN")]
    scopehold: Option<PathBuf>,
}

fn percentiles(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let at = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<44} n={:<5} p50 {:>7.3} ms  p90 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms",
        samples.len(),
        ms(at(0.5)),
        ms(at(0.9)),
        ms(at(0.99)),
        ms(*samples.last().unwrap())
    );
    at(0.5)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn rss(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let binary = args.scopehold.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .unwrap()
            .parent()
            .and_then(|d| d.parent())
            .map(|d| d.join("scopehold"))
            .unwrap()
    });
    assert!(
        binary.exists(),
        "{} does not exist: cargo build --release --bin scopehold",
        binary.display()
    );
    let pki = test_pki();
    let up = upstream(&pki).await;
    let port = up.addr.port();
    let tmp = tempfile::tempdir().unwrap();
    let (values, agent) = (tmp.path().join("values"), tmp.path().join("agent"));
    std::fs::create_dir_all(&values).unwrap();
    std::fs::create_dir_all(&agent).unwrap();
    put_value(&values, "api-key", "sk-bench-0");
    let upstream_ca = tmp.path().join("upstream-ca.crt");
    std::fs::write(&upstream_ca, &pki.ca_pem).unwrap();
    let rules = json!({
        "namespace": "bench", "agent": "coder",
        "grants": [{"grant": "openai", "secret": "llm", "keys": [{"key": "api-key", "file": "api-key",
            "proxy": {"hosts": [format!("localhost:{port}")], "header": {"name": "Authorization", "template": "Bearer {value}"}}}]}],
    });
    let sidecar = Sidecar::start(&binary, &values, &agent, tmp.path(), &rules, &upstream_ca);
    let roots = tmp.path().join("roots.crt");
    let mut trust = std::fs::read_to_string(agent.join("ca.crt")).unwrap();
    trust.push_str(&pki.ca_pem);
    std::fs::write(&roots, trust).unwrap();
    let host = format!("localhost:{port}");

    println!(
        "bench_proxy: binary {}, load average at start {}",
        binary.display(),
        loadavg()
    );
    let direct = || RustClient::direct(up.addr, &host, "localhost", &roots);
    let proxied = || RustClient::connect(sidecar.addr, &host, "localhost", &roots);

    // Kept-alive connection.
    let mut d = direct().await.unwrap();
    let mut p = proxied().await.unwrap();
    for _ in 0..200 {
        d.get("/v1", &[]).await.unwrap();
        p.get("/v1", &[]).await.unwrap();
    }
    let (mut ds, mut ps) = (Vec::new(), Vec::new());
    for _ in 0..args.requests {
        let t = Instant::now();
        assert_eq!(d.get("/v1", &[]).await.unwrap().status, 200);
        ds.push(t.elapsed());
        let t = Instant::now();
        assert_eq!(p.get("/v1", &[]).await.unwrap().status, 200);
        ps.push(t.elapsed());
    }
    let d50 = percentiles("kept-alive, direct", ds);
    let p50 = percentiles("kept-alive, through the sidecar", ps);
    println!(
        "  added at p50: {:.3} ms",
        (p50.as_secs_f64() - d50.as_secs_f64()) * 1000.0
    );

    // New connection per request.
    let (mut ds, mut ps) = (Vec::new(), Vec::new());
    for _ in 0..args.connections {
        let t = Instant::now();
        let mut c = direct().await.unwrap();
        c.get("/v1", &[]).await.unwrap();
        ds.push(t.elapsed());
        let t = Instant::now();
        let mut c = proxied().await.unwrap();
        c.get("/v1", &[]).await.unwrap();
        ps.push(t.elapsed());
    }
    let d50 = percentiles("new TLS connection + request, direct", ds);
    let p50 = percentiles("new TLS connection + request, sidecar", ps);
    println!(
        "  added at p50: {:.3} ms",
        (p50.as_secs_f64() - d50.as_secs_f64()) * 1000.0
    );

    // Throughput.
    for (name, through) in [("direct", false), ("through the sidecar", true)] {
        let deadline = Instant::now() + Duration::from_secs(args.seconds);
        let mut tasks = Vec::new();
        for _ in 0..args.concurrency {
            let mut c = if through {
                proxied().await.unwrap()
            } else {
                direct().await.unwrap()
            };
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    c.get("/v1", &[]).await.unwrap();
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        println!(
            "requests/s, {} connections, {name:<20} {:>8.0}  (load average {})",
            args.concurrency,
            total as f64 / args.seconds as f64,
            loadavg()
        );
    }
    println!("sidecar memory after the runs: {}", rss(sidecar.child.id()));

    // Rotation and revocation.
    let mut c = proxied().await.unwrap();
    let (mut rot, mut rev) = (Vec::new(), Vec::new());
    for i in 1..=args.events {
        let value = format!("sk-bench-{i}");
        let want = format!("Bearer {value}");
        let t = Instant::now();
        put_value(&values, "api-key", &value);
        loop {
            c.get("/v1", &[]).await.unwrap();
            if up
                .last_seen()
                .and_then(|s| s.header("authorization").map(str::to_owned))
                == Some(want.clone())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        rot.push(t.elapsed());
        let t = Instant::now();
        std::fs::remove_file(values.join("api-key")).unwrap();
        while c.get("/v1", &[]).await.unwrap().status != 403 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        rev.push(t.elapsed());
        put_value(&values, "api-key", &value);
        while c.get("/v1", &[]).await.unwrap().status != 200 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    percentiles("rotation: file swapped -> new value upstream", rot);
    percentiles("revocation: file removed -> 403", rev);
    println!("load average at end {}", loadavg());
}
