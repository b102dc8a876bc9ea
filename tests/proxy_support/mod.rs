//! Shared by tests/proxy.rs and examples/bench_proxy.rs: a test CA, a real
//! HTTPS upstream on loopback that records what it receives, the sidecar as
//! a child process, and a Rust (hyper + rustls) client speaking CONNECT.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

#[allow(clippy::duplicate_mod)]
pub mod pki;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[allow(unused_imports)]
pub use pki::{TestPki, test_pki};

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub host: String,
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Everything the upstream got, as one string to search.
    pub fn all(&self) -> String {
        format!("{} {} {:?}", self.method, self.uri, self.headers)
    }
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The latest request only (cloning all of them costs milliseconds once
    /// a benchmark has sent a few hundred thousand).
    pub fn last_seen(&self) -> Option<Seen> {
        self.seen.lock().unwrap().last().cloned()
    }
}

/// A real HTTPS server on 127.0.0.1. `/echo` answers with the request
/// headers (a debug endpoint that would leak an injected value);
/// `/redirect?…` answers 302 to the same path on the *other* name
/// (127.0.0.1), carrying the query along, as many APIs do.
pub async fn upstream(pki: &TestPki) -> Upstream {
    let certs = vec![CertificateDer::from_pem_slice(pki.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move {
                        let headers: Vec<(String, String)> = req
                            .headers()
                            .iter()
                            .map(|(n, v)| {
                                (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into())
                            })
                            .collect();
                        let host = req
                            .headers()
                            .get("host")
                            .map(|h| h.to_str().unwrap_or("").to_string())
                            .unwrap_or_default();
                        let uri = req.uri().to_string();
                        log.lock().unwrap().push(Seen {
                            host: host.clone(),
                            method: req.method().to_string(),
                            uri: uri.clone(),
                            headers: headers.clone(),
                        });
                        let _ = req.into_body().collect().await;
                        let mut response = http::Response::builder();
                        let body = if uri.starts_with("/echo") {
                            headers
                                .iter()
                                .map(|(n, v)| format!("{n}: {v}\n"))
                                .collect::<String>()
                                + &format!("uri: {uri}\n")
                        } else if let Some(rest) = uri.strip_prefix("/redirect") {
                            let port = host.rsplit(':').next().unwrap_or("443");
                            response = response.status(302).header(
                                "location",
                                format!("https://127.0.0.1:{port}/landed{rest}"),
                            );
                            String::new()
                        } else {
                            "ok\n".to_string()
                        };
                        Ok::<_, std::convert::Infallible>(
                            response.body(Full::new(Bytes::from(body))).unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Upstream { addr, seen }
}

/// The sidecar as a child process (the real `scopehold proxy` binary),
/// with its stdout (log and audit lines) collected.
pub struct Sidecar {
    pub child: Child,
    pub addr: SocketAddr,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Sidecar {
    pub fn start(
        binary: &Path,
        values_dir: &Path,
        agent_dir: &Path,
        cwd: &Path,
        rules: &serde_json::Value,
        upstream_ca: &Path,
    ) -> Sidecar {
        Self::start_with(binary, values_dir, agent_dir, cwd, rules, upstream_ca, &[])
    }

    /// [`Sidecar::start`] with more flags (e.g. usage reporting).
    pub fn start_with(
        binary: &Path,
        values_dir: &Path,
        agent_dir: &Path,
        cwd: &Path,
        rules: &serde_json::Value,
        upstream_ca: &Path,
        extra: &[&str],
    ) -> Sidecar {
        let mut child = Command::new(binary)
            .args(["proxy", "--listen", "127.0.0.1:0", "--pod", "agent-pod-1"])
            .arg("--values-dir")
            .arg(values_dir)
            .arg("--agent-dir")
            .arg(agent_dir)
            .arg("--upstream-ca")
            .arg(upstream_ca)
            .arg("--rules")
            .arg(rules.to_string())
            .args(extra)
            .current_dir(cwd)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start scopehold proxy");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if line.contains("proxy listening") {
                        let _ = tx.send(line.clone());
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let ready = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the proxy logs 'proxy listening'");
        let json: serde_json::Value = serde_json::from_str(&ready).unwrap();
        let addr = json["listen"].as_str().unwrap().parse().unwrap();
        Sidecar { child, addr, lines }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Audit lines (target `audit`), parsed.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|j| j["target"] == "audit")
            .collect()
    }
}

impl Sidecar {
    /// Waits (at most 10 s) until the audit lines satisfy `ok`: lines are
    /// written when a response body ends and read by another thread.
    pub async fn audit_until(
        &self,
        what: &str,
        ok: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let start = Instant::now();
        loop {
            let audit = self.audit();
            if ok(&audit) {
                return audit;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no audit line: {what}\n{audit:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response as a client saw it: status, head and body as text.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// A Rust client: CONNECT through the proxy, TLS (server name `sni`,
/// trusting `roots`), then requests on one kept-alive connection.
pub struct RustClient {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    pub host_header: String,
}

impl RustClient {
    pub async fn connect(
        proxy: SocketAddr,
        connect_to: &str,
        sni: &str,
        roots: &Path,
    ) -> Result<RustClient, BoxError> {
        let mut tcp = TcpStream::connect(proxy).await?;
        tcp.set_nodelay(true)?;
        tcp.write_all(
            format!("CONNECT {connect_to} HTTP/1.1\r\nHost: {connect_to}\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if tcp.read(&mut byte).await? == 0 {
                return Err("proxy closed during CONNECT".into());
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("CONNECT refused: {head}").into());
        }
        Self::handshake(tcp, connect_to, sni, roots).await
    }

    /// The same client without the proxy: straight to `addr`.
    pub async fn direct(
        addr: SocketAddr,
        host_header: &str,
        sni: &str,
        roots: &Path,
    ) -> Result<RustClient, BoxError> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        Self::handshake(tcp, host_header, sni, roots).await
    }

    async fn handshake(
        tcp: TcpStream,
        host_header: &str,
        sni: &str,
        roots: &Path,
    ) -> Result<RustClient, BoxError> {
        let mut store = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(roots)? {
            store.add(cert?)?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(sni.to_string())?, tcp)
            .await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        Ok(RustClient {
            sender,
            host_header: host_header.to_string(),
        })
    }

    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Got, BoxError> {
        let mut req = http::Request::get(path).header("host", self.host_header.as_str());
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        self.sender.ready().await?;
        let response = self
            .sender
            .send_request(req.body(Full::new(Bytes::new()))?)
            .await?;
        let status = response.status().as_u16();
        let head = format!("{:?}", response.headers());
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Got {
            status,
            head,
            body: String::from_utf8_lossy(&body).into(),
        })
    }
}

/// Writes `value` as `file` the way the node plugin's atomic writer
/// replaces content: a new file renamed over the old one.
pub fn put_value(dir: &Path, file: &str, value: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, value).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

/// Every file below `dir`, with its content.
pub fn files_below(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.push((path, bytes));
            }
        }
    }
    out
}

/// Polls `f` until it returns Some, for at most `limit`.
pub async fn until<T>(
    limit: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> Option<(T, Duration)> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(t) = f().await {
            return Some((t, start.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

pub fn empty() -> Empty<Bytes> {
    Empty::new()
}
