//! The custody gRPC service (`scopehold.v1.Custody`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::runtime::events::EventType;
use kube::{Api, Client, Resource, ResourceExt};
use tonic::{Request, Response, Status};

use super::caller_cache::CallerCache;
use super::decide::{self, Denial, DenyReason, GrantedFile, PodAsk, Presenter};
use super::delivered::Delivered;
use super::fanout::NodeFanout;
use super::invalidations::{self, InvalidationStream};
use super::metrics::{CallerLabel, Counted, CustodyMetrics};
use super::proxy_pod;
use super::resolutions::ResolutionLog;
use super::token_review::{self, ReviewError, TokenClaims};
use crate::api::grant::Resolution;
use crate::api::validation::{is_dns1123_label, is_dns1123_subdomain};
use crate::api::{AgentIdentity, DeliveryMode, SecretGrant, TOKEN_AUDIENCE};
use crate::audit::{AuditRecord, Decision};
use crate::caches::Caches;
use crate::event_series::{EventSink, Occurrence};
use crate::policy::evaluate::{AgentState, GrantEvaluation, SecretState, evaluate_grant};
use crate::proto::scopehold::v1 as pb;
use crate::proxy::pod::SidecarSettings;
use crate::proxy::rules::GrantRules;
use crate::secrets::SecretBytes;

/// The ServiceAccount the node plugins run as; only it may call custody.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePluginAccount {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for NodePluginAccount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(NodePluginAccount {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("expected NAMESPACE/NAME, got {s:?}")),
        }
    }
}

pub struct CustodyService {
    client: Client,
    caches: Caches,
    events: EventSink,
    node_account: NodePluginAccount,
    resolutions: Arc<ResolutionLog>,
    request_seq: AtomicU64,
    callers: CallerCache,
    metrics: Arc<CustodyMetrics>,
    /// Longest a Resolve may wait on the API server before answering
    /// UNAVAILABLE: kubelet retries, and a stalled API server must not hold
    /// every publish on the node for the node plugin's whole request timeout.
    decision_timeout: Duration,
    /// What each volume was last given, to tell republishes from resolutions.
    delivered: Delivered,
    /// Routes invalidations to the nodes they concern; started with the
    /// first stream (inside the runtime).
    fanout: std::sync::OnceLock<NodeFanout>,
    /// How this controller's webhook injects the proxy sidecar: proxy
    /// grants go only to a sidecar exactly like it.
    sidecar: SidecarSettings,
}

/// Default of [`CustodyService::with_decision_timeout`].
pub const DEFAULT_DECISION_TIMEOUT: Duration = Duration::from_secs(4);

impl CustodyService {
    pub fn new(
        client: Client,
        caches: Caches,
        events: EventSink,
        node_account: NodePluginAccount,
        resolutions: Arc<ResolutionLog>,
        metrics: Arc<CustodyMetrics>,
    ) -> Self {
        CustodyService {
            client,
            caches,
            events,
            node_account,
            resolutions,
            request_seq: AtomicU64::new(0),
            callers: CallerCache::default(),
            metrics,
            decision_timeout: DEFAULT_DECISION_TIMEOUT,
            delivered: Delivered::default(),
            fanout: std::sync::OnceLock::new(),
            sidecar: SidecarSettings::default(),
        }
    }

    /// The settings the webhook and `kubectl scopehold inject` render the
    /// proxy sidecar with (image, port, usage target, upstream CA).
    pub fn with_sidecar(mut self, sidecar: SidecarSettings) -> Self {
        self.sidecar = sidecar;
        self
    }

    /// How long a Resolve may wait on the API server (token reviews, reads)
    /// before it answers UNAVAILABLE.
    pub fn with_decision_timeout(mut self, timeout: Duration) -> Self {
        self.decision_timeout = timeout;
        self
    }

    /// `work`, or UNAVAILABLE once the decision timeout has passed.
    async fn within_decision_timeout<T>(
        &self,
        what: &str,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, Status> {
        tokio::time::timeout(self.decision_timeout, work)
            .await
            .map_err(|_| {
                tracing::warn!(
                    what,
                    timeout_ms = u64::try_from(self.decision_timeout.as_millis()).unwrap_or(u64::MAX),
                    "custody could not decide in time: the API server did not answer"
                );
                Status::unavailable(format!(
                    "custody could not decide within {:.1}s ({what}): the API server did not answer; retry",
                    self.decision_timeout.as_secs_f64()
                ))
            })
    }

    fn request_id(&self, given: &str) -> String {
        let clean: String = given
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(64)
            .collect();
        if !clean.is_empty() {
            return clean;
        }
        let seq = self.request_seq.fetch_add(1, Ordering::Relaxed);
        format!("c{:x}-{seq}", Timestamp::now().as_nanosecond() as u64)
    }

    /// Authenticates the calling node plugin and returns its node.
    async fn authenticate_caller<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Status::unauthenticated("missing bearer token of the node plugin"))?;
        if let Some(node) = self.callers.node_of(token, Instant::now()) {
            return Ok(node);
        }
        self.metrics
            .token_reviews
            .get_or_create(&CallerLabel {
                token: "node_plugin",
            })
            .inc();
        let claims = token_review::review(&self.client, token, TOKEN_AUDIENCE)
            .await
            .map_err(|e| match e {
                ReviewError::Api(_) => {
                    Status::unavailable(format!("verifying the node plugin: {e}"))
                }
                other => Status::unauthenticated(format!("node plugin token: {other}")),
            })?;
        if claims.namespace != self.node_account.namespace
            || claims.service_account != self.node_account.name
        {
            return Err(Status::permission_denied(format!(
                "ServiceAccount {}/{} is not the node plugin's",
                claims.namespace, claims.service_account
            )));
        }
        let node = claims.node_name.ok_or_else(|| {
            Status::permission_denied("node plugin token is not bound to a pod on a node")
        })?;
        self.callers.remember(token, &node, Instant::now());
        Ok(node)
    }

    async fn resolve_inner(
        &self,
        req: &pb::ResolveRequest,
        node: &str,
        request_id: &str,
    ) -> Result<pb::ResolveResponse, Refusal> {
        for (field, value) in [
            ("pod_namespace", &req.pod_namespace),
            ("pod_name", &req.pod_name),
            ("pod_uid", &req.pod_uid),
            ("pod_token", &req.pod_token),
        ] {
            if value.is_empty() {
                return Err(Refusal::Invalid(format!("{field} is required")));
            }
        }
        if !req.node_name.is_empty() && req.node_name != node {
            return Err(Refusal::denied(
                DenyReason::WrongNode,
                format!(
                    "request names node {:?} but the caller runs on {node:?}",
                    req.node_name
                ),
            ));
        }
        if !self.caches.is_synced() {
            return Err(Refusal::Unavailable(
                "custody caches are not synced yet".into(),
            ));
        }
        if !is_dns1123_label(&req.pod_namespace) || !is_dns1123_subdomain(&req.pod_name) {
            return Err(Refusal::Invalid(
                "pod_namespace and pod_name must be Kubernetes object names".into(),
            ));
        }
        self.metrics
            .token_reviews
            .get_or_create(&CallerLabel { token: "pod" })
            .inc();
        let claims: TokenClaims =
            token_review::review(&self.client, &req.pod_token, TOKEN_AUDIENCE)
                .await
                .map_err(|e| match e {
                    ReviewError::Api(_) => {
                        Refusal::Unavailable(format!("verifying the pod token: {e}"))
                    }
                    other => Refusal::denied(DenyReason::TokenRejected, other.to_string()),
                })?;
        // From here on every denial also names who presented the token.
        self.resolve_verified(req, node, request_id, &claims)
            .await
            .map_err(|refusal| refusal.presented_by(&claims))
    }

    /// The pod a Resolve names (None: it does not exist).
    async fn read_pod(&self, req: &pb::ResolveRequest) -> Result<Option<Pod>, Refusal> {
        self.metrics.pod_reads.inc();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &req.pod_namespace);
        pods.get_opt(&req.pod_name)
            .await
            .map_err(|e| Refusal::Unavailable(format!("reading the pod: {e}")))
    }

    /// [`Self::resolve_inner`] once the pod token is verified.
    async fn resolve_verified(
        &self,
        req: &pb::ResolveRequest,
        node: &str,
        request_id: &str,
        claims: &TokenClaims,
    ) -> Result<pb::ResolveResponse, Refusal> {
        let ask = PodAsk {
            namespace: &req.pod_namespace,
            name: &req.pod_name,
            uid: &req.pod_uid,
            service_account: &req.service_account_name,
        };
        decide::check_pod_claims(claims, &ask, node).map_err(Refusal::Denied)?;
        // One API request per publish: the verified token names the pod, its
        // UID and its node (Kubernetes 1.30+ adds the node claims to
        // pod-bound tokens), and the API server refuses to bind a token to a
        // pod of another ServiceAccount. Only a token without node claims
        // (older clusters, or a pod bound before its Node existed) needs the
        // Pod object to learn the node.
        let mut pod_read = None;
        if claims.node_name.is_none() {
            let pod = self.read_pod(req).await?;
            check_pod_object(claims, pod.as_ref(), node)?;
            pod_read = pod;
        }

        // Before the stores are read: the answer is at least this new.
        let versions = self.caches.versions.snapshot();
        let identity = decide::select_identity(
            self.caches
                .identities_claiming(&claims.namespace, &claims.service_account),
            &claims.namespace,
            &claims.service_account,
        )
        .map_err(Refusal::Denied)?;
        let agent = identity.name_any();
        let mut evaluated = Vec::new();
        let mut secrets: BTreeMap<String, Arc<crate::secrets::CachedSecret>> = BTreeMap::new();
        let now = Timestamp::now();
        for grant in self.caches.grants_of_agent(&claims.namespace, &agent) {
            let grant = grant.as_ref();
            let secret = self
                .caches
                .secrets
                .get_or_fetch(&self.client, &claims.namespace, &grant.spec.secret_name)
                .await
                .map_err(|e| Refusal::Unavailable(e.to_string()))?;
            let evaluation = evaluate_grant(
                grant,
                AgentState::Present {
                    identity: &identity,
                    conflict: false,
                },
                SecretState::cached(&self.caches.secrets, secret.as_deref()),
                now,
            );
            if let Some(s) = secret {
                secrets.insert(grant.spec.secret_name.clone(), s);
            }
            evaluated.push((Arc::new(grant.clone()), evaluation));
        }
        let chosen = decide::select_grants(evaluated, &req.grants, &agent)
            .map_err(|d| Refusal::DeniedFor(d, Some(identity.clone())))?;
        // Proxy grants cost a Pod read: they go only to ScopeHold's sidecar.
        let proxied: Vec<&SecretGrant> = chosen
            .iter()
            .map(|(g, _)| g.as_ref())
            .filter(|g| g.spec.delivery == DeliveryMode::Proxy)
            .collect();
        if !proxied.is_empty() {
            let pod = match pod_read {
                Some(pod) => Some(pod),
                None => self.read_pod(req).await?,
            };
            let pod = check_pod_object(claims, pod.as_ref(), node)?;
            let names: Vec<String> = proxied.iter().map(|g| g.name_any()).collect();
            let current: Vec<GrantRules> = proxied.iter().map(|g| GrantRules::of(g)).collect();
            proxy_pod::check(
                pod,
                &names,
                &current,
                &claims.namespace,
                &agent,
                &self.sidecar,
            )
            .map_err(|e| {
                Refusal::DeniedFor(
                    Denial::new(DenyReason::NotTheProxySidecar, e.to_string()),
                    Some(identity.clone()),
                )
            })?;
        }

        let mut response = pb::ResolveResponse {
            agent: agent.clone(),
            grants: Vec::new(),
            refresh_after_seconds: 0,
            versions: invalidations::versions_to_proto(versions),
        };
        let mut earliest_expiry: Option<Timestamp> = None;
        for (grant, evaluation) in &chosen {
            let data = secrets
                .get(&grant.spec.secret_name)
                .map(|s| s.data.clone())
                .unwrap_or_default();
            let files = decide::files_for(grant, &data, req.fs_group);
            if let Some(at) = evaluation.expires_at {
                earliest_expiry = Some(earliest_expiry.map_or(at, |e: Timestamp| e.min(at)));
            }
            response.grants.push(to_proto(grant, evaluation, files));
            self.audit_resolved(grant, evaluation, &identity, req, node, request_id);
        }
        response.refresh_after_seconds = earliest_expiry
            .map(|at| u32::try_from(at.duration_since(now).as_secs().max(0)).unwrap_or(u32::MAX))
            .unwrap_or(0);
        Ok(response)
    }

    fn audit_resolved(
        &self,
        grant: &SecretGrant,
        evaluation: &GrantEvaluation,
        identity: &AgentIdentity,
        req: &pb::ResolveRequest,
        node: &str,
        request_id: &str,
    ) {
        let namespace = req.pod_namespace.clone();
        let digest = evaluation.content_digest.as_deref();
        if self
            .delivered
            .repeat(&req.pod_uid, &req.volume_id, &grant.name_any(), digest)
        {
            self.metrics.unchanged_deliveries.inc();
            tracing::debug!(
                namespace = %namespace,
                pod = %req.pod_name,
                grant = %grant.name_any(),
                contentDigest = digest.unwrap_or("-"),
                requestID = request_id,
                "unchanged content delivered again (republish): not a new resolution"
            );
            return;
        }
        let mut record = AuditRecord::new("SecretResolved", Decision::Allowed, &namespace);
        record.reason = Some("Granted".into());
        record.agent = Some(identity.name_any());
        record.service_account = Some(identity.spec.service_account_name.clone());
        record.pod = Some(req.pod_name.clone());
        record.pod_uid = Some(req.pod_uid.clone());
        record.node = Some(node.to_owned());
        record.grant = Some(grant.name_any());
        record.secret = Some(grant.spec.secret_name.clone());
        record.keys = grant.key_names();
        record.content_digest = evaluation.content_digest.clone();
        record.request_id = Some(request_id.to_owned());
        record.emit();
        let now = Time(Timestamp::now());
        self.resolutions.record(
            &namespace,
            &grant.name_any(),
            &identity.name_any(),
            Resolution {
                pod: req.pod_name.clone(),
                pod_uid: Some(req.pod_uid.clone()),
                node: Some(node.to_owned()),
                time: now,
                digest: evaluation.content_digest.clone(),
            },
        );
        // One Event series per grant and content: the pods are in the audit
        // lines, so a burst of mounts is a few Event writes, not one each.
        let note = format!(
            "agent {} received keys {} of Secret {} (digest {}); each pod is in the audit log",
            identity.name_any(),
            grant.key_names().join(","),
            grant.spec.secret_name,
            evaluation.content_digest.as_deref().unwrap_or("-")
        );
        self.publish_event(
            "SecretResolved",
            EventType::Normal,
            note,
            grant.object_ref(&()),
            Some(identity.object_ref(&())),
        );
    }

    fn audit_denied(
        &self,
        denial: &Denial,
        identity: Option<&AgentIdentity>,
        req: &pb::ResolveRequest,
        node: &str,
        request_id: &str,
    ) {
        let mut record = AuditRecord::new("AccessDenied", Decision::Denied, &req.pod_namespace);
        record.reason = Some(denial.reason.as_str().to_owned());
        record.agent = identity.map(|i| i.name_any());
        record.service_account = identity
            .map(|i| i.spec.service_account_name.clone())
            .or_else(|| {
                (!req.service_account_name.is_empty()).then(|| req.service_account_name.clone())
            });
        record.pod = Some(req.pod_name.clone());
        record.pod_uid = Some(req.pod_uid.clone());
        record.node = Some(node.to_owned());
        record.grant = (!req.grants.is_empty()).then(|| req.grants.join(","));
        record.request_id = Some(request_id.to_owned());
        record.message = Some(denial.message.clone());
        if let Some(presenter) = &denial.presented_by {
            record.caller_user = Some(presenter.user.clone());
            record.caller_pod = presenter.pod.clone();
            record.caller_pod_uid = presenter.pod_uid.clone();
        }
        record.emit();
        let mut note = format!("{}: {}", denial.reason.as_str(), denial.message);
        if let Some(presenter) = &denial.presented_by {
            note.push_str(&format!(
                " (token presented by {}, pod {} uid {})",
                presenter.user,
                presenter.pod.as_deref().unwrap_or("-"),
                presenter.pod_uid.as_deref().unwrap_or("-")
            ));
        }
        let regarding = match identity {
            Some(i) => i.object_ref(&()),
            None => pod_reference(req),
        };
        self.publish_event(
            "AccessDenied",
            EventType::Warning,
            note,
            regarding,
            Some(pod_reference(req)),
        );
    }

    /// Events are counted into series and written in the background: the
    /// mount waits for neither.
    fn publish_event(
        &self,
        reason: &str,
        type_: EventType,
        note: String,
        regarding: ObjectReference,
        related: Option<ObjectReference>,
    ) {
        self.publish_event_as("Resolve", reason, type_, note, regarding, related);
    }

    fn publish_event_as(
        &self,
        action: &str,
        reason: &str,
        type_: EventType,
        note: String,
        regarding: ObjectReference,
        related: Option<ObjectReference>,
    ) {
        self.events.record(Occurrence {
            regarding,
            related,
            reason: reason.to_owned(),
            action: action.to_owned(),
            type_,
            note,
        });
    }
}

impl CustodyService {
    /// Resolve, with the denial reason (for the decision metric) beside the
    /// status.
    async fn resolve_counted(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, (Status, Option<String>)> {
        let node = self
            .within_decision_timeout(
                "verifying the node plugin",
                self.authenticate_caller(&request),
            )
            .await
            .and_then(|verified| verified)
            .map_err(|s| (s, None))?;
        let req = request.into_inner();
        let request_id = self.request_id(&req.request_id);
        let decided = self
            .within_decision_timeout("resolving", self.resolve_inner(&req, &node, &request_id))
            .await
            .map_err(|s| (s, Some("Unavailable".to_owned())))?;
        match decided {
            Ok(response) => Ok(Response::new(response)),
            Err(Refusal::Invalid(message)) => Err((
                Status::invalid_argument(message),
                Some("InvalidRequest".to_owned()),
            )),
            Err(Refusal::Unavailable(message)) => {
                Err((Status::unavailable(message), Some("Unavailable".to_owned())))
            }
            Err(Refusal::Denied(denial)) => {
                // The identity, when there is one, is the natural subject of
                // the denial Event (kubectl describe agentidentity shows it).
                let identity = if req.service_account_name.is_empty() {
                    None
                } else {
                    self.caches
                        .identities_claiming(&req.pod_namespace, &req.service_account_name)
                        .into_iter()
                        .next()
                };
                self.audit_denied(&denial, identity.as_deref(), &req, &node, &request_id);
                Err((
                    denial_status(&denial),
                    Some(denial.reason.as_str().to_owned()),
                ))
            }
            Err(Refusal::DeniedFor(denial, identity)) => {
                self.audit_denied(&denial, identity.as_deref(), &req, &node, &request_id);
                Err((
                    denial_status(&denial),
                    Some(denial.reason.as_str().to_owned()),
                ))
            }
        }
    }
}

fn pod_reference(req: &pb::ResolveRequest) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: Some(req.pod_namespace.clone()),
        name: Some(req.pod_name.clone()),
        uid: Some(req.pod_uid.clone()),
        ..Default::default()
    }
}

fn to_proto(
    grant: &SecretGrant,
    evaluation: &GrantEvaluation,
    files: Vec<GrantedFile>,
) -> pb::ResolvedGrant {
    pb::ResolvedGrant {
        grant: grant.name_any(),
        secret: grant.spec.secret_name.clone(),
        content_digest: evaluation.content_digest.clone().unwrap_or_default(),
        expires_at: evaluation.expires_at.map(|t| prost_types::Timestamp {
            seconds: t.as_second(),
            nanos: 0,
        }),
        files: files
            .into_iter()
            .map(|f| {
                let SecretBytes(content) = f.content;
                pb::File {
                    path: f.path,
                    key: f.key,
                    mode: f.mode,
                    content,
                }
            })
            .collect(),
    }
}

/// Why a Resolve call did not succeed, before it becomes a gRPC status.
enum Refusal {
    Invalid(String),
    Unavailable(String),
    Denied(Denial),
    DeniedFor(Denial, Option<Arc<AgentIdentity>>),
}

impl Refusal {
    fn denied(reason: DenyReason, message: impl Into<String>) -> Self {
        Refusal::Denied(Denial::new(reason, message))
    }

    /// Records the verified token's holder in a denial.
    fn presented_by(mut self, claims: &TokenClaims) -> Self {
        if let Refusal::Denied(denial) | Refusal::DeniedFor(denial, _) = &mut self {
            denial.presented_by = Some(Presenter::of(claims));
        }
        self
    }
}

#[tonic::async_trait]
impl pb::custody_server::Custody for CustodyService {
    async fn resolve(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        let started = Instant::now();
        let answer = self.resolve_counted(request).await;
        let (result, reason) = match &answer {
            Ok(_) => ("allowed", "Granted".to_owned()),
            Err((status, reason)) => (
                match status.code() {
                    tonic::Code::InvalidArgument => "invalid",
                    tonic::Code::Unavailable => "unavailable",
                    tonic::Code::Unauthenticated if reason.is_none() => "unauthenticated",
                    _ => "denied",
                },
                reason.clone().unwrap_or_else(|| "Caller".to_owned()),
            ),
        };
        self.metrics
            .decided(result, &reason, started.elapsed().as_secs_f64());
        answer.map_err(|(status, _)| status)
    }

    type WatchInvalidationsStream = InvalidationStream;

    async fn watch_invalidations(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchInvalidationsStream>, Status> {
        let node = self
            .within_decision_timeout(
                "verifying the node plugin",
                self.authenticate_caller(&request),
            )
            .await??;
        tracing::info!(%node, "node plugin subscribed to invalidations");
        let fanout = self
            .fanout
            .get_or_init(|| NodeFanout::spawn(self.client.clone(), self.caches.clone()));
        let stream = Counted::new(fanout.stream_for(node), self.metrics.clone());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn grant_states(
        &self,
        request: Request<pb::GrantStatesRequest>,
    ) -> Result<Response<pb::GrantStatesResponse>, Status> {
        let node = self
            .within_decision_timeout(
                "verifying the node plugin",
                self.authenticate_caller(&request),
            )
            .await??;
        if !self.caches.is_synced() {
            return Err(Status::unavailable("custody caches are not synced yet"));
        }
        let refs = request.into_inner().grants;
        if refs.len() > 10_000 {
            return Err(Status::invalid_argument("at most 10000 grants per call"));
        }
        let grants = invalidations::grant_states(&self.caches, &self.client, &node, refs).await;
        Ok(Response::new(pb::GrantStatesResponse { grants }))
    }

    async fn report(
        &self,
        request: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let node = self
            .within_decision_timeout(
                "verifying the node plugin",
                self.authenticate_caller(&request),
            )
            .await??;
        let reports = request.into_inner().reports;
        if reports.len() > MAX_REPORTS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_REPORTS} reports per call"
            )));
        }
        let reports = self
            .within_decision_timeout(
                "checking the reported pods",
                self.reports_about_own_pods(&node, reports),
            )
            .await??;
        let accepted = self.publish_reports(&node, &reports);
        Ok(Response::new(pb::ReportResponse { accepted }))
    }
}

/// Most reports accepted in one Report call.
const MAX_REPORTS: usize = 256;
/// Longest name, reason or digest accepted in a report.
const MAX_REPORT_FIELD: usize = 253;

/// A report the node plugin may send, checked: known event, bounded
/// fields. Names are not otherwise trusted: the Event says which node
/// reported it (from the verified token).
fn checked_report(report: &pb::NodeReport) -> Option<&'static str> {
    let event = match report.event.as_str() {
        "ContentWithdrawn" => "ContentWithdrawn",
        "SecretRotated" => "SecretRotated",
        _ => return None,
    };
    let fields = [
        &report.reason,
        &report.namespace,
        &report.agent,
        &report.grant,
        &report.secret,
        &report.pod_name,
        &report.pod_uid,
        &report.content_digest,
    ];
    let bounded = fields.iter().all(|f| f.len() <= MAX_REPORT_FIELD)
        && report.keys.len() <= 64
        && report.keys.iter().all(|k| k.len() <= MAX_REPORT_FIELD);
    let named = is_dns1123_label(&report.namespace)
        && is_dns1123_subdomain(&report.pod_name)
        && !report.grant.is_empty();
    (bounded && named).then_some(event)
}

impl CustodyService {
    /// The reports whose pod runs on the calling `node`. A report about a pod
    /// on another node refuses the whole call: the node plugin never sends
    /// one, so whoever does is not a well-behaved plugin. Reports about a pod
    /// that is gone, or was replaced (another UID), cannot be placed and are
    /// dropped (not accepted).
    ///
    /// One list of the node's pods per namespace, not a GET per pod: a
    /// revocation on a node with 200 volumes sends 200 reports at once. Only
    /// a pod that list does not show (gone, or elsewhere) is read by name.
    async fn reports_about_own_pods(
        &self,
        node: &str,
        reports: Vec<pb::NodeReport>,
    ) -> Result<Vec<pb::NodeReport>, Status> {
        let unavailable = |what: String, e: kube::Error| {
            Status::unavailable(format!("reading {what} to check the report: {e}"))
        };
        // namespace → the node's pods there: name → UID.
        let mut on_node: BTreeMap<String, BTreeMap<String, Option<String>>> = BTreeMap::new();
        // Pods the lists did not show, read by name (None: gone).
        let mut elsewhere: BTreeMap<(String, String), Option<Pod>> = BTreeMap::new();
        let mut own = Vec::with_capacity(reports.len());
        for report in reports {
            if checked_report(&report).is_none() {
                continue;
            }
            let namespace = report.namespace.clone();
            if !on_node.contains_key(&namespace) {
                let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
                let listed = pods
                    .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
                    .await
                    .map_err(|e| {
                        unavailable(format!("the pods of node {node} in {namespace}"), e)
                    })?;
                let names = listed
                    .items
                    .into_iter()
                    .map(|pod| (pod.name_any(), pod.metadata.uid))
                    .collect();
                on_node.insert(namespace.clone(), names);
            }
            let listed_uid = on_node
                .get(&namespace)
                .and_then(|pods| pods.get(&report.pod_name))
                .cloned();
            let (uid, pod_node) = match listed_uid {
                Some(uid) => (uid, Some(node.to_owned())),
                None => {
                    let key = (namespace.clone(), report.pod_name.clone());
                    if !elsewhere.contains_key(&key) {
                        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
                        let pod = pods.get_opt(&report.pod_name).await.map_err(|e| {
                            unavailable(format!("pod {namespace}/{}", report.pod_name), e)
                        })?;
                        elsewhere.insert(key.clone(), pod);
                    }
                    let Some(Some(pod)) = elsewhere.get(&key) else {
                        continue;
                    };
                    let pod_node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
                    (pod.metadata.uid.clone(), pod_node)
                }
            };
            if !report.pod_uid.is_empty() && uid.as_deref() != Some(report.pod_uid.as_str()) {
                continue;
            }
            if pod_node.as_deref() != Some(node) {
                tracing::warn!(
                    %node,
                    namespace = %report.namespace,
                    pod = %report.pod_name,
                    "refused a report about a pod on another node"
                );
                return Err(Status::permission_denied(format!(
                    "pod {}/{} does not run on node {node}: a node plugin may report only about pods on its own node",
                    report.namespace, report.pod_name
                )));
            }
            own.push(report);
        }
        Ok(own)
    }

    /// Turns node-plugin reports into Events regarding the grant, related to
    /// the pod.
    fn publish_reports(&self, node: &str, reports: &[pb::NodeReport]) -> u32 {
        let mut accepted = 0;
        for report in reports {
            let Some(event) = checked_report(report) else {
                continue;
            };
            let regarding = self
                .caches
                .grants
                .get(
                    &kube::runtime::reflector::ObjectRef::new(&report.grant)
                        .within(&report.namespace),
                )
                .map(|grant| grant.object_ref(&()))
                .unwrap_or_else(|| ObjectReference {
                    api_version: Some("scopehold.dev/v1alpha1".into()),
                    kind: Some("SecretGrant".into()),
                    namespace: Some(report.namespace.clone()),
                    name: Some(report.grant.clone()),
                    ..Default::default()
                });
            // Per grant and reason, not per pod or node: a rotation reaching
            // 200 pods is one series. The node plugin writes an audit line per
            // pod; custody adds one naming the reporting node.
            let keys = report.keys.join(",");
            let digest = if report.content_digest.is_empty() {
                "-"
            } else {
                report.content_digest.as_str()
            };
            let note = match event {
                "ContentWithdrawn" => format!(
                    "keys {keys} of Secret {} withdrawn from running pods ({}); each pod is in the audit log",
                    report.secret, report.reason
                ),
                _ => format!(
                    "keys {keys} of Secret {} replaced in running pods (new digest {digest}); each pod is in the audit log",
                    report.secret
                ),
            };
            let action = if event == "ContentWithdrawn" {
                "Withdraw"
            } else {
                "Rotate"
            };
            let decision = if event == "ContentWithdrawn" {
                Decision::Denied
            } else {
                Decision::Changed
            };
            let mut record = AuditRecord::new(event, decision, &report.namespace);
            record.reason = (!report.reason.is_empty()).then(|| report.reason.clone());
            record.agent = (!report.agent.is_empty()).then(|| report.agent.clone());
            record.pod = Some(report.pod_name.clone());
            record.pod_uid = (!report.pod_uid.is_empty()).then(|| report.pod_uid.clone());
            record.node = Some(node.to_owned());
            record.grant = Some(report.grant.clone());
            record.secret = (!report.secret.is_empty()).then(|| report.secret.clone());
            record.keys = report.keys.clone();
            record.content_digest =
                (!report.content_digest.is_empty()).then(|| report.content_digest.clone());
            record.message = Some(format!("reported by the node plugin on node {node}"));
            record.emit();
            self.publish_event_as(action, event, EventType::Normal, note, regarding, None);
            self.metrics
                .reports
                .get_or_create(&super::metrics::KindLabel {
                    kind: event.to_owned(),
                })
                .inc();
            accepted += 1;
        }
        accepted
    }
}

fn denial_status(denial: &Denial) -> Status {
    let message = format!("{}: {}", denial.reason.as_str(), denial.message);
    match denial.reason {
        DenyReason::TokenRejected => Status::unauthenticated(message),
        _ => Status::permission_denied(message),
    }
}

/// The token review is cached by the API server for a few seconds, so a
/// deleted pod's token still passes; the Pod object itself must exist with
/// the same UID, ServiceAccount and node.
fn check_pod_object<'p>(
    claims: &TokenClaims,
    pod: Option<&'p Pod>,
    node: &str,
) -> Result<&'p Pod, Refusal> {
    let name = claims.pod_name.as_deref().unwrap_or_default();
    let pod = pod.ok_or_else(|| {
        Refusal::denied(
            DenyReason::PodNotFound,
            format!("pod {name:?} does not exist"),
        )
    })?;
    if pod.metadata.uid.as_deref() != claims.pod_uid.as_deref() {
        return Err(Refusal::denied(
            DenyReason::PodNotFound,
            format!("pod {name:?} was replaced (UID differs)"),
        ));
    }
    let spec = pod.spec.as_ref();
    let pod_node = spec
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or_default();
    if pod_node != node {
        return Err(Refusal::denied(
            DenyReason::WrongNode,
            format!("pod {name:?} runs on node {pod_node:?}, not on the calling node {node:?}"),
        ));
    }
    let pod_sa = spec
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default");
    if pod_sa != claims.service_account {
        return Err(Refusal::denied(
            DenyReason::TokenMismatch,
            "pod runs as another ServiceAccount",
        ));
    }
    Ok(pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(event: &str) -> pb::NodeReport {
        pb::NodeReport {
            event: event.into(),
            reason: "Revoked".into(),
            namespace: "team".into(),
            agent: "bot".into(),
            grant: "g".into(),
            secret: "s".into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            keys: vec!["k".into()],
            content_digest: "0123456789ab".into(),
        }
    }

    #[test]
    fn only_known_bounded_and_named_reports_are_accepted() {
        assert_eq!(
            checked_report(&report("ContentWithdrawn")),
            Some("ContentWithdrawn")
        );
        assert_eq!(
            checked_report(&report("SecretRotated")),
            Some("SecretRotated")
        );
        assert_eq!(checked_report(&report("SecretResolved")), None);
        let mut unnamed = report("ContentWithdrawn");
        unnamed.grant.clear();
        assert_eq!(checked_report(&unnamed), None);
        let mut long = report("ContentWithdrawn");
        long.reason = "x".repeat(300);
        assert_eq!(checked_report(&long), None);
        let mut many = report("ContentWithdrawn");
        many.keys = vec!["k".into(); 65];
        assert_eq!(checked_report(&many), None);
    }
}
