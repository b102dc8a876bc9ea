//! Delivery mode `proxy` end to end on loopback: the real `scopehold proxy`
//! binary between real clients (curl, Python requests, a Rust hyper+rustls
//! client) and a real HTTPS upstream with a CA of its own. The upstream must
//! receive the value; the agent's side (its files, every response, every
//! audit line) must never contain it; hosts outside the grant get the
//! placeholder as it is.
//!
//! Timings printed here (rotation, revocation) are observations; the
//! figures live in BENCHMARKS.md (examples/bench_proxy.rs).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod proxy_support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use proxy_support::{
    Sidecar, TestPki, Upstream, files_below, put_value, test_pki, until, upstream,
};
use serde_json::json;

struct Fixture {
    tmp: tempfile::TempDir,
    upstream: Upstream,
    sidecar: Sidecar,
    values: PathBuf,
    agent: PathBuf,
    /// The agent's trust: the sidecar's bundle (public roots + pod CA) plus
    /// the test upstream's CA (a private upstream the agent reaches
    /// directly through the tunnel).
    bundle: PathBuf,
    value: String,
    token: String,
    ph_value: String,
    ph_token: String,
    port: u16,
    _pki: TestPki,
}

fn random(prefix: &str) -> String {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).unwrap();
    format!("{prefix}{}", hex::encode(b))
}

async fn fixture(allow: Option<Vec<&str>>) -> Fixture {
    let pki = test_pki();
    let upstream = upstream(&pki).await;
    let port = upstream.addr.port();
    let tmp = tempfile::tempdir().unwrap();
    let (values, agent, cwd) = (
        tmp.path().join("values"),
        tmp.path().join("agent"),
        tmp.path().join("cwd"),
    );
    for d in [&values, &agent, &cwd] {
        std::fs::create_dir_all(d).unwrap();
    }
    let value = random("sk-live-");
    let token = random("tok-");
    put_value(&values, "api-key", &format!("{value}\n"));
    put_value(&values, "token", &token);
    let upstream_ca = tmp.path().join("upstream-ca.crt");
    std::fs::write(&upstream_ca, &pki.ca_pem).unwrap();
    let granted = format!("localhost:{port}");
    let mut rules = json!({
        "namespace": "team-a",
        "agent": "coder",
        "grants": [
            {"grant": "openai", "secret": "llm", "keys": [{"key": "api-key", "file": "api-key",
              "proxy": {"hosts": [granted], "header": {"name": "Authorization", "template": "Bearer {value}"}}}]},
            {"grant": "search", "secret": "search", "keys": [{"key": "token", "file": "token",
              "proxy": {"hosts": [granted], "replacePlaceholder": true}}]},
        ],
    });
    if let Some(allow) = allow {
        rules["egressAllowList"] = json!(allow);
    }
    let sidecar = Sidecar::start(
        Path::new(env!("CARGO_BIN_EXE_scopehold")),
        &values,
        &agent,
        &cwd,
        &rules,
        &upstream_ca,
    );
    let bundle = tmp.path().join("agent-trust.crt");
    let mut trust = std::fs::read_to_string(agent.join("ca-bundle.crt")).unwrap();
    trust.push_str(&pki.ca_pem);
    std::fs::write(&bundle, trust).unwrap();
    let ph_value = std::fs::read_to_string(agent.join("placeholders/api-key")).unwrap();
    let ph_token = std::fs::read_to_string(agent.join("placeholders/token")).unwrap();
    Fixture {
        tmp,
        upstream,
        sidecar,
        values,
        agent,
        bundle,
        value,
        token,
        ph_value,
        ph_token,
        port,
        _pki: pki,
    }
}

impl Fixture {
    fn proxy_url(&self) -> String {
        format!("http://{}", self.sidecar.addr)
    }

    /// The agent's environment, as the webhook sets it.
    fn agent_env(&self) -> Vec<(&'static str, String)> {
        let bundle = self.bundle.display().to_string();
        vec![
            ("HTTPS_PROXY", self.proxy_url()),
            ("HTTP_PROXY", self.proxy_url()),
            // curl reads only the lower-case http_proxy (httpoxy).
            ("http_proxy", self.proxy_url()),
            ("https_proxy", self.proxy_url()),
            ("NO_PROXY", String::new()),
            ("SSL_CERT_FILE", bundle.clone()),
            ("CURL_CA_BUNDLE", bundle.clone()),
            ("REQUESTS_CA_BUNDLE", bundle.clone()),
            ("NODE_EXTRA_CA_CERTS", bundle),
        ]
    }

    async fn curl(&self, args: &[&str]) -> Output {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "-i", "--max-time", "10"]).args(args);
        for (k, v) in self.agent_env() {
            cmd.env(k, v);
        }
        cmd.output().await.unwrap()
    }

    async fn python(&self, code: &str) -> Output {
        let mut cmd = tokio::process::Command::new("python3");
        cmd.args(["-c", code]);
        for (k, v) in self.agent_env() {
            cmd.env(k, v);
        }
        cmd.output().await.unwrap()
    }

    /// Nothing the agent can see holds the value or the token.
    fn assert_agent_blind(&self, what: &str, text: &str) {
        assert!(
            !text.contains(&self.value),
            "{what} contains the value:\n{text}"
        );
        assert!(
            !text.contains(&self.token),
            "{what} contains the token:\n{text}"
        );
    }

    fn last_seen(&self) -> proxy_support::Seen {
        self.upstream
            .seen()
            .last()
            .cloned()
            .expect("upstream received a request")
    }
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_python_and_rust_use_the_key_without_ever_seeing_it() {
    let f = fixture(None).await;
    let granted = format!("https://localhost:{}", f.port);

    // curl: the upstream gets the header from the template; the agent sent
    // only its placeholder.
    let o = f
        .curl(&[
            &format!("{granted}/v1/models?limit=1"),
            "-H",
            &format!("Authorization: Bearer {}", f.ph_value),
        ])
        .await;
    assert!(out(&o).contains("HTTP/1.1 200"), "{}", out(&o));
    f.assert_agent_blind("curl output", &out(&o));
    let seen = f.last_seen();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {}", f.value).as_str())
    );
    assert_eq!(seen.uri, "/v1/models?limit=1");

    // An upstream that echoes the request: the agent reads its placeholder
    // where the value was.
    let o = f.curl(&[&format!("{granted}/echo?q={}", f.ph_token)]).await;
    let text = out(&o);
    f.assert_agent_blind("curl /echo", &text);
    assert!(text.contains(&format!("Bearer {}", f.ph_value)), "{text}");
    assert!(text.contains(&format!("q={}", f.ph_token)), "{text}");
    assert!(f.last_seen().uri.contains(&format!("q={}", f.token)));

    // Python requests, through the same environment variables.
    let code = format!(
        "import requests\nr = requests.get('{granted}/echo', params={{'key': '{}'}}, headers={{'x-api-key': 'k={}'}})\nprint(r.status_code)\nprint(dict(r.headers))\nprint(r.text)",
        f.ph_token, f.ph_token
    );
    let o = f.python(&code).await;
    let text = out(&o);
    assert!(o.status.success() && text.starts_with("200"), "{text}");
    f.assert_agent_blind("python output", &text);
    let seen = f.last_seen();
    assert_eq!(
        seen.header("x-api-key"),
        Some(format!("k={}", f.token).as_str())
    );
    assert!(
        seen.uri.contains(&format!("key={}", f.token)),
        "{}",
        seen.uri
    );
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {}", f.value).as_str())
    );

    // A Rust client (hyper + rustls) on one kept-alive connection.
    let mut client = proxy_support::RustClient::connect(
        f.sidecar.addr,
        &format!("localhost:{}", f.port),
        "localhost",
        &f.bundle,
    )
    .await
    .unwrap();
    for _ in 0..3 {
        let got = client.get("/echo", &[]).await.unwrap();
        assert_eq!(got.status, 200);
        f.assert_agent_blind("rust client", &format!("{}{}", got.head, got.body));
        assert_eq!(
            f.last_seen().header("authorization"),
            Some(format!("Bearer {}", f.value).as_str())
        );
    }

    // A host outside the grant (same server, other name): the placeholders
    // arrive unreplaced, through a tunnel the proxy cannot read.
    let other = format!("https://127.0.0.1:{}", f.port);
    let o = f
        .curl(&[
            &format!("{other}/v1/upload?key={}", f.ph_token),
            "-H",
            &format!("Authorization: Bearer {}", f.ph_value),
        ])
        .await;
    assert!(out(&o).contains("HTTP/1.1 200"), "{}", out(&o));
    let seen = f.last_seen();
    f.assert_agent_blind("what the other host received", &seen.all());
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {}", f.ph_value).as_str())
    );
    assert!(seen.uri.contains(&f.ph_token));

    // The agent's files: placeholders and certificates only.
    for (path, bytes) in files_below(&f.agent) {
        f.assert_agent_blind(
            &path.display().to_string(),
            &String::from_utf8_lossy(&bytes),
        );
    }
    for (k, v) in f.agent_env() {
        f.assert_agent_blind(k, &v);
    }

    // One audit line per proxied request: names, host, path without query,
    // status; never a value, a token or a placeholder.
    let audit = f
        .sidecar
        .audit_until("six ProxyRequest lines", |a| {
            a.iter().filter(|a| a["event"] == "ProxyRequest").count() >= 6
        })
        .await;
    let proxied: Vec<_> = audit
        .iter()
        .filter(|a| a["event"] == "ProxyRequest")
        .collect();
    assert_eq!(proxied.len(), 2 + 1 + 3, "{audit:#?}");
    let first = proxied[0];
    assert_eq!(first["grant"], "openai");
    assert_eq!(first["keys"], "api-key");
    assert_eq!(first["host"], format!("localhost:{}", f.port));
    assert_eq!(first["path"], "/v1/models");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["status"], 200);
    assert_eq!(first["agent"], "coder");
    assert_eq!(first["pod"], "agent-pod-1");
    assert_eq!(proxied[1]["grant"], "openai,search");
    // The tunnel's line is written when the tunnel closes.
    let tunnel_host = format!("127.0.0.1:{}", f.port);
    f.sidecar
        .audit_until("ProxyTunnel for the other host", |a| {
            a.iter()
                .any(|a| a["event"] == "ProxyTunnel" && a["host"] == tunnel_host.as_str())
        })
        .await;
    for line in f.sidecar.lines() {
        f.assert_agent_blind("a log line", &line);
        assert!(
            !line.contains(&f.ph_value) && !line.contains(&f.ph_token),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_revocation_reach_the_next_request() {
    let f = fixture(None).await;
    let mut client = proxy_support::RustClient::connect(
        f.sidecar.addr,
        &format!("localhost:{}", f.port),
        "localhost",
        &f.bundle,
    )
    .await
    .unwrap();
    assert_eq!(client.get("/v1", &[]).await.unwrap().status, 200);

    // Rotation: the node plugin swaps the file; the very connection the
    // agent keeps open carries the new value.
    let rotated = random("sk-rotated-");
    put_value(&f.values, "api-key", &rotated);
    let want = format!("Bearer {rotated}");
    let (_, took) = until(Duration::from_secs(10), async || {
        let got = client.get("/v1", &[]).await.ok()?;
        (got.status == 200 && f.last_seen().header("authorization") == Some(&want)).then_some(())
    })
    .await
    .expect("the rotated value is injected");
    println!("rotation injected after {took:?}");

    // Revocation: the node plugin removes the file; the next requests are
    // refused by the proxy, naming the grant, and never reach the upstream.
    std::fs::remove_file(f.values.join("api-key")).unwrap();
    let (got, took) = until(Duration::from_secs(10), async || {
        let got = client.get("/v1", &[]).await.ok()?;
        (got.status == 403).then_some(got)
    })
    .await
    .expect("a revoked grant refuses");
    println!("revocation refused after {took:?}");
    assert!(got.body.contains("SecretGrant \"openai\""), "{}", got.body);
    assert!(got.body.contains("revoked"), "{}", got.body);
    let before = f.upstream.seen().len();
    let again = client.get("/v1", &[]).await.unwrap();
    assert_eq!(again.status, 403);
    assert_eq!(
        f.upstream.seen().len(),
        before,
        "a refused request reached the upstream"
    );
    f.sidecar
        .audit_until("GrantWithdrawn", |a| {
            a.iter().any(|a| {
                a["reason"] == "GrantWithdrawn"
                    && a["grant"] == "openai"
                    && a["decision"] == "denied"
                    && a["status"] == 403
            })
        })
        .await;

    // Reinstated: injection resumes.
    put_value(&f.values, "api-key", &rotated);
    until(Duration::from_secs(10), async || {
        (client.get("/v1", &[]).await.ok()?.status == 200).then_some(())
    })
    .await
    .expect("a reinstated grant injects again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_mismatched_hosts_never_carry_the_value() {
    let f = fixture(None).await;
    let granted = format!("https://localhost:{}", f.port);

    // The upstream redirects to another host and carries the query along
    // (which held the injected token). The Location the agent gets holds
    // the placeholder, so following it sends the placeholder, not the value.
    let o = f
        .curl(&["-L", &format!("{granted}/redirect?key={}", f.ph_token)])
        .await;
    let text = out(&o);
    f.assert_agent_blind("curl -L", &text);
    let seen = f.upstream.seen();
    let landed = seen
        .iter()
        .find(|s| s.uri.starts_with("/landed"))
        .unwrap_or_else(|| panic!("curl followed the redirect: {text}\n{seen:#?}"));
    assert_eq!(landed.host, format!("127.0.0.1:{}", f.port));
    f.assert_agent_blind("the redirect target's request", &landed.all());
    assert!(landed.uri.contains(&f.ph_token), "{}", landed.uri);

    // Host header naming another host than the TLS connection: refused.
    let n = f.upstream.seen().len();
    let o = f
        .curl(&[
            &format!("{granted}/v1"),
            "-H",
            &format!("Host: 127.0.0.1:{}", f.port),
        ])
        .await;
    assert!(out(&o).contains("HTTP/1.1 421"), "{}", out(&o));
    assert!(out(&o).contains("does not match"), "{}", out(&o));
    assert_eq!(f.upstream.seen().len(), n);

    // TLS server name naming another host than CONNECT: no handshake.
    let sni = proxy_support::RustClient::connect(
        f.sidecar.addr,
        &format!("localhost:{}", f.port),
        "elsewhere.test",
        &f.bundle,
    )
    .await;
    assert!(sni.is_err(), "a mismatched SNI was accepted");
    assert_eq!(f.upstream.seen().len(), n);
    f.sidecar
        .audit_until("SniMismatch", |a| {
            a.iter().any(|a| a["reason"] == "SniMismatch")
        })
        .await;

    // Plain http to a granted host: refused, nothing sent.
    let o = f.curl(&[&format!("http://localhost:{}/v1", f.port)]).await;
    assert!(out(&o).contains("HTTP/1.1 403"), "{}", out(&o));
    assert_eq!(f.upstream.seen().len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_allow_list_refuses_every_other_host() {
    let f = fixture(Some(vec!["example.invalid"])).await;
    let o = f.curl(&[&format!("https://127.0.0.1:{}/v1", f.port)]).await;
    assert!(out(&o).contains("403"), "{}", out(&o));
    assert!(f.upstream.seen().is_empty());
    let host = format!("127.0.0.1:{}", f.port);
    f.sidecar
        .audit_until("EgressNotAllowed", |a| {
            a.iter()
                .any(|a| a["reason"] == "EgressNotAllowed" && a["host"] == host.as_str())
        })
        .await;
    let o = f.curl(&[&format!("https://localhost:{}/v1", f.port)]).await;
    assert!(out(&o).contains("HTTP/1.1 200"), "{}", out(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_key_is_on_no_disk() {
    let f = fixture(None).await;
    // Make the sidecar mint a leaf, then look at everything it could have
    // written: its working directory, both volumes, the temp tree.
    let o = f.curl(&[&format!("https://localhost:{}/v1", f.port)]).await;
    assert!(out(&o).contains("HTTP/1.1 200"), "{}", out(&o));
    let files = files_below(f.tmp.path());
    assert!(files.iter().any(|(p, _)| p.ends_with("ca.crt")));
    for (path, bytes) in &files {
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !text.contains("PRIVATE KEY"),
            "{} holds a private key",
            path.display()
        );
    }
    // Nor does the sidecar keep a file open that is not its own volumes'.
    // Its standard streams are whatever this test process was given (a file
    // when the run's output is redirected to one): not files it opened.
    let pid = f.sidecar.child.id();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|fd| !matches!(fd.file_name().to_str(), Some("0" | "1" | "2")))
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.display().to_string();
            assert!(
                !t.starts_with('/') || t.starts_with("/dev/") || t.starts_with("/proc/"),
                "the sidecar holds {t} open"
            );
        }
    }
}
