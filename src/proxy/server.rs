//! The proxy the agent's HTTPS_PROXY/HTTP_PROXY point at (127.0.0.1 only).
//! CONNECT to a granted host: terminate the agent's TLS with a leaf from the
//! pod's CA, inject, forward over the proxy's own verified TLS connection.
//! CONNECT elsewhere: a byte tunnel (or a refusal under an allow-list).
//! Plain-HTTP requests: forwarded for other hosts, refused for granted ones
//! (a value never travels in clear text).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

use super::audit::{ProxyUse, Usage};
use super::ca::PodCa;
use super::inject::{self, Compiled, Refusal, Target};
use super::scrub::ScrubBody;
use super::tunnel;
use super::values::ValueStore;
use crate::audit::Decision;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// What every connection shares.
pub struct Proxy {
    pub namespace: String,
    pub agent: String,
    pub pod: String,
    pub compiled: Compiled,
    pub values: Arc<ValueStore>,
    pub ca: PodCa,
    pub upstream_tls: Arc<rustls::ClientConfig>,
    pub usage: Arc<Usage>,
}

impl Proxy {
    fn record(&self, target: &Target, method: &Method, path: &str) -> ProxyUse {
        ProxyUse {
            namespace: self.namespace.clone(),
            agent: self.agent.clone(),
            pod: self.pod.clone(),
            host: target.to_string(),
            method: method.to_string(),
            path: path.to_owned(),
            usage: Some(self.usage.clone()),
            ..Default::default()
        }
    }
}

/// Accepts agent connections until the listener fails.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) -> std::io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| front(proxy.clone(), req));
            let result = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
            if let Err(error) = result {
                tracing::debug!(%error, %peer, "proxy: agent connection ended");
            }
        });
    }
}

fn text(status: StatusCode, reason: &str, message: String) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(message + "\n"))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(reason) {
        response.headers_mut().insert("x-scopehold-refused", v);
    }
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn refuse(record: &mut ProxyUse, refusal: Refusal) -> Response<ProxyBody> {
    record.decision = Decision::Denied;
    record.reason = Some(refusal.reason);
    record.status = refusal.status.as_u16();
    record.grants = refusal.grants;
    record.latency_ms = record.started.elapsed().as_secs_f64() * 1000.0;
    record.emit();
    text(refusal.status, refusal.reason, refusal.message)
}

/// A request on the agent's plain connection to the proxy.
async fn front(
    proxy: Arc<Proxy>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, BoxError> {
    let default_port = if req.method() == Method::CONNECT {
        443
    } else {
        80
    };
    let Some(authority) = req.uri().authority().cloned() else {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "NotAProxyRequest",
            "scopehold proxy: send CONNECT host:port or an absolute http:// URL".into(),
        ));
    };
    let target = Target::parse(&authority, default_port);
    let path = req.uri().path().to_owned();
    let mut record = proxy.record(&target, req.method(), &path);
    if !proxy.compiled.may_reach(&target) {
        record.event = "ProxyRefused";
        return Ok(refuse(
            &mut record,
            Refusal {
                status: StatusCode::FORBIDDEN,
                reason: "EgressNotAllowed",
                message: format!(
                    "scopehold proxy: {target} is not on the egress allow-list of agent {:?}",
                    proxy.agent
                ),
                grants: vec![],
            },
        ));
    }
    let granted = !proxy.compiled.keys_for(&target).is_empty();
    if req.method() == Method::CONNECT {
        let upstream = if granted {
            None
        } else {
            record.event = "ProxyTunnel";
            match tunnel::dial(&target).await {
                Ok(upstream) => Some(upstream),
                Err(error) => {
                    return Ok(refuse(
                        &mut record,
                        Refusal {
                            status: StatusCode::BAD_GATEWAY,
                            reason: "UpstreamUnreachable",
                            message: format!(
                                "scopehold proxy: cannot connect to {target}: {error}"
                            ),
                            grants: vec![],
                        },
                    ));
                }
            }
        };
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            match (upgrade.await, upstream) {
                (Ok(upgraded), None) => intercept(proxy, TokioIo::new(upgraded), target).await,
                (Ok(upgraded), Some(upstream)) => {
                    tunnel::run(TokioIo::new(upgraded), upstream, record).await
                }
                (Err(error), _) => tracing::debug!(%error, "proxy: CONNECT upgrade failed"),
            }
        });
        return Ok(Response::new(
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed_unsync(),
        ));
    }
    if granted {
        return Ok(refuse(
            &mut record,
            Refusal {
                status: StatusCode::FORBIDDEN,
                reason: "PlainHttpToGrantedHost",
                message: format!(
                    "scopehold proxy: {target} receives injected keys only over https; nothing was sent"
                ),
                grants: vec![],
            },
        ));
    }
    forward_plain(req, target, record).await
}

/// Plain HTTP to a host that holds no grant: forwarded as it is.
async fn forward_plain(
    req: Request<Incoming>,
    target: Target,
    record: ProxyUse,
) -> Result<Response<ProxyBody>, BoxError> {
    let (mut parts, body) = req.into_parts();
    strip_proxy_headers(&mut parts.headers);
    parts.uri = origin_form(&parts.uri)?;
    let result = async {
        let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok::<_, BoxError>(
            sender
                .send_request(Request::from_parts(parts, body))
                .await?,
        )
    }
    .await;
    respond(result, vec![], record)
}

fn respond(
    result: Result<Response<Incoming>, BoxError>,
    scrub: Vec<(Vec<u8>, Vec<u8>)>,
    mut record: ProxyUse,
) -> Result<Response<ProxyBody>, BoxError> {
    record.latency_ms = record.started.elapsed().as_secs_f64() * 1000.0;
    match result {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            record.status = parts.status.as_u16();
            scrub_headers(&mut parts.headers, &scrub);
            if !scrub.is_empty() {
                // A masked body changes length (placeholder and value
                // differ): the agent gets it chunked.
                parts.headers.remove(http::header::CONTENT_LENGTH);
            }
            let body = ScrubBody::new(body, scrub, record).boxed_unsync();
            Ok(Response::from_parts(parts, body))
        }
        Err(error) => {
            tracing::debug!(%error, host = %record.host, "proxy: upstream failed");
            let message = format!("scopehold proxy: upstream {} failed", record.host);
            Ok(refuse(
                &mut record,
                Refusal {
                    status: StatusCode::BAD_GATEWAY,
                    reason: "UpstreamFailed",
                    message,
                    grants: vec![],
                },
            ))
        }
    }
}

fn scrub_headers(headers: &mut http::HeaderMap, scrub: &[(Vec<u8>, Vec<u8>)]) {
    for (_, v) in headers.iter_mut() {
        for (needle, with) in scrub {
            if inject::find(v.as_bytes(), needle).is_some() {
                let masked = inject::replace_all(v.as_bytes(), needle, with);
                *v = http::HeaderValue::from_bytes(&masked)
                    .unwrap_or_else(|_| http::HeaderValue::from_static("(masked)"));
            }
        }
    }
}

fn strip_proxy_headers(headers: &mut http::HeaderMap) {
    headers.remove(http::header::PROXY_AUTHORIZATION);
    headers.remove("proxy-connection");
}

fn origin_form(uri: &http::Uri) -> Result<http::Uri, BoxError> {
    let pq = uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
    Ok(pq.parse()?)
}

/// The agent's TLS to a granted host, terminated here.
async fn intercept(proxy: Arc<Proxy>, io: TokioIo<hyper::upgrade::Upgraded>, target: Target) {
    let start = match tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io)
        .await
    {
        Ok(start) => start,
        Err(error) => {
            tracing::debug!(%error, %target, "proxy: agent TLS handshake failed");
            return;
        }
    };
    let sni = start
        .client_hello()
        .server_name()
        .map(str::to_ascii_lowercase);
    if let Some(sni) = &sni
        && *sni != target.host
    {
        // The agent opened the tunnel for one host and speaks TLS for
        // another: nothing it sends here is checked against the grant.
        let mut record = proxy.record(&target, &Method::CONNECT, "");
        record.event = "ProxyRefused";
        record.decision = Decision::Denied;
        record.reason = Some("SniMismatch");
        record.emit();
        return;
    }
    let config = match proxy.ca.server_config(&target.host) {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(%error, %target, "proxy: cannot mint a leaf");
            return;
        }
    };
    let tls = match start.into_stream(config).await {
        Ok(tls) => tls,
        Err(error) => {
            tracing::debug!(%error, %target, "proxy: agent TLS handshake failed");
            return;
        }
    };
    let conn = Arc::new(InterceptConn {
        proxy,
        target,
        upstream: tokio::sync::Mutex::new(None),
    });
    let service = service_fn(move |req| conn.clone().handle(req));
    if let Err(error) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await
    {
        tracing::debug!(%error, "proxy: intercepted connection ended");
    }
}

struct InterceptConn {
    proxy: Arc<Proxy>,
    target: Target,
    /// One upstream connection per agent connection, kept alive alike.
    upstream: tokio::sync::Mutex<Option<SendRequest<Incoming>>>,
}

impl InterceptConn {
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, BoxError> {
        let started = Instant::now();
        let (mut parts, body) = req.into_parts();
        let mut record = self
            .proxy
            .record(&self.target, &parts.method, parts.uri.path());
        record.started = started;
        record.request_bytes = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        if let Err(refusal) = inject::check_authority(&parts, &self.target) {
            return Ok(refuse(&mut record, refusal));
        }
        let keys = self.proxy.compiled.keys_for(&self.target);
        let snapshot = self.proxy.values.snapshot();
        let injected = match inject::inject(&mut parts, &keys, &snapshot) {
            Ok(i) => i,
            Err(refusal) => {
                record.keys = keys.iter().map(|k| k.key.clone()).collect();
                return Ok(refuse(&mut record, refusal));
            }
        };
        drop(snapshot);
        let mut grants: Vec<String> = injected.used.iter().map(|(g, _)| g.clone()).collect();
        grants.dedup();
        record.grants = grants;
        record.keys = injected.used.iter().map(|(_, k)| k.clone()).collect();
        strip_proxy_headers(&mut parts.headers);
        parts.uri = origin_form(&parts.uri)?;
        if !injected.scrub.is_empty() {
            // Compressed bodies could not be searched for an echoed value.
            parts.headers.insert(
                http::header::ACCEPT_ENCODING,
                http::HeaderValue::from_static("identity"),
            );
        }
        let result = self.send(Request::from_parts(parts, body)).await;
        respond(result, injected.scrub, record)
    }

    async fn send(&self, req: Request<Incoming>) -> Result<Response<Incoming>, BoxError> {
        let mut slot = self.upstream.lock().await;
        let reusable = match slot.as_mut() {
            Some(sender) if !sender.is_closed() => sender.ready().await.is_ok(),
            _ => false,
        };
        if !reusable {
            *slot = Some(self.connect().await?);
        }
        let sender = slot.as_mut().ok_or("no upstream connection")?;
        Ok(sender.send_request(req).await?)
    }

    async fn connect(&self) -> Result<SendRequest<Incoming>, BoxError> {
        let tcp = TcpStream::connect((self.target.host.as_str(), self.target.port)).await?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.target.host.clone())?;
        let tls = tokio_rustls::TlsConnector::from(self.proxy.upstream_tls.clone())
            .connect(name, tcp)
            .await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "proxy: upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// Listens on `addr` (loopback in a pod).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
