//! Which node plugins an invalidation concerns: each node's stream carries
//! only the changes about agents with pods on that node, so a node does not
//! learn every namespace's grant, agent and Secret names.
//!
//! One router per custody process turns every change into an invalidation
//! and its audience: the nodes of the pods that run as the agent's
//! ServiceAccount, from one Pod list per agent (field selector
//! `spec.serviceAccountName`, a consistent read). The Pod objects are what
//! every replica agrees on — the replica holding a node's stream need not be
//! the one that resolved the node's pods — and a pod is bound to its node
//! before kubelet publishes its volume, so a volume still being published is
//! covered too. When the list fails, the change goes to every node: a
//! revocation must not be lost to keep a name private.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_stream::wrappers::BroadcastStream;

use super::invalidations::{InvalidationStream, resync, to_proto};
use crate::api::AgentIdentity;
use crate::caches::{Caches, Change, ChangeKind};
use crate::proto::scopehold::v1 as pb;

/// Routed invalidations buffered per stream; a stream that falls further
/// behind is told to resynchronise instead.
const ROUTED_BUFFER: usize = 4096;
/// Changes routed together: one Pod list per agent among them.
const BATCH: usize = 256;
/// Longest wait for a Pod list: a stalled API server must not hold back
/// invalidations, which then go to every node instead.
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The nodes an invalidation is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Audience {
    /// Every node: RESYNC (it names nothing), or the pods could not be listed.
    Every,
    Nodes(Arc<BTreeSet<String>>),
}

impl Audience {
    pub fn includes(&self, node: &str) -> bool {
        match self {
            Audience::Every => true,
            Audience::Nodes(nodes) => nodes.contains(node),
        }
    }
}

#[derive(Clone, Debug)]
struct Routed {
    invalidation: pb::Invalidation,
    audience: Audience,
}

/// The router's output, shared by every stream of this process.
pub struct NodeFanout {
    routed: broadcast::Sender<Routed>,
}

impl NodeFanout {
    /// Subscribes to the caches' changes now (nothing published after this
    /// call is missed) and routes them in a background task.
    pub fn spawn(client: Client, caches: Caches) -> Self {
        let changes = caches.changes.subscribe();
        let routed = broadcast::channel(ROUTED_BUFFER).0;
        let router = Router {
            pods: PodLister(client),
            caches,
            service_accounts: HashMap::new(),
        };
        tokio::spawn(router.run(changes, routed.clone()));
        NodeFanout { routed }
    }

    /// A RESYNC first (the plugin may have missed changes while
    /// disconnected), then the changes that concern `node`; a subscriber that
    /// falls behind gets a RESYNC instead of the changes it missed.
    pub fn stream_for(&self, node: String) -> InvalidationStream {
        let routed = BroadcastStream::new(self.routed.subscribe()).filter_map(move |item| {
            let out = match item {
                Ok(r) if r.audience.includes(&node) => Some(Ok(r.invalidation)),
                Ok(_) => None,
                Err(_lagged) => Some(Ok(resync())),
            };
            std::future::ready(out)
        });
        Box::pin(stream::once(async { Ok(resync()) }).chain(routed))
    }
}

/// Where an agent's pods run.
trait Placement {
    /// Nodes of the pods in `namespace` running as `service_account`, or as
    /// anyone when `None`.
    async fn nodes(
        &self,
        namespace: &str,
        service_account: Option<&str>,
    ) -> Result<BTreeSet<String>, String>;

    /// Nodes of the pods in `namespace`, by ServiceAccount: one list for a
    /// batch that concerns several agents there (a Secret granted to many).
    async fn nodes_by_account(
        &self,
        namespace: &str,
    ) -> Result<HashMap<String, BTreeSet<String>>, String>;
}

/// Reads Pods to learn where an agent's pods run.
pub(crate) struct PodLister(pub(crate) Client);

impl PodLister {
    /// Whether a pod of `agent` in `namespace` runs on `node` (of anyone in
    /// the namespace when the agent's identity is not known).
    pub(crate) async fn agent_runs_on(
        &self,
        caches: &Caches,
        namespace: &str,
        agent: &str,
        node: &str,
    ) -> Result<bool, String> {
        let identity: Option<Arc<AgentIdentity>> = caches
            .identities
            .get(&ObjectRef::new(agent).within(namespace));
        let sa = identity
            .as_ref()
            .map(|i| i.spec.service_account_name.as_str());
        Ok(self.nodes(namespace, sa).await?.contains(node))
    }
}

impl PodLister {
    /// (ServiceAccount, node) of each bound pod in `namespace` that runs as
    /// `service_account` (as anyone when `None`).
    async fn placed(
        &self,
        namespace: &str,
        service_account: Option<&str>,
    ) -> Result<Vec<(String, String)>, String> {
        let pods: Api<Pod> = Api::namespaced(self.0.clone(), namespace);
        let mut params = ListParams::default();
        if let Some(sa) = service_account {
            params = params.fields(&format!("spec.serviceAccountName={sa}"));
        }
        let listed = tokio::time::timeout(LOOKUP_TIMEOUT, pods.list(&params))
            .await
            .map_err(|_| format!("no answer within {LOOKUP_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        Ok(listed
            .items
            .into_iter()
            .filter_map(|pod| {
                let spec = pod.spec?;
                let node = spec.node_name.filter(|n| !n.is_empty())?;
                let sa = spec
                    .service_account_name
                    .unwrap_or_else(|| "default".to_owned());
                Some((sa, node))
            })
            .collect())
    }
}

impl Placement for PodLister {
    async fn nodes(
        &self,
        namespace: &str,
        service_account: Option<&str>,
    ) -> Result<BTreeSet<String>, String> {
        let placed = self.placed(namespace, service_account).await?;
        Ok(placed.into_iter().map(|(_, node)| node).collect())
    }

    async fn nodes_by_account(
        &self,
        namespace: &str,
    ) -> Result<HashMap<String, BTreeSet<String>>, String> {
        let mut by_account: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (sa, node) in self.placed(namespace, None).await? {
            by_account.entry(sa).or_default().insert(node);
        }
        Ok(by_account)
    }
}

/// A namespace's pods' nodes by ServiceAccount, or why not.
type Listed = Result<HashMap<String, BTreeSet<String>>, String>;

struct Router<P> {
    pods: P,
    caches: Caches,
    /// Every ServiceAccount each (namespace, agent) was seen to claim: a
    /// deleted identity, or one that changed its ServiceAccount, still has
    /// pods of the old one holding its files.
    service_accounts: HashMap<(String, String), BTreeSet<String>>,
}

impl<P: Placement> Router<P> {
    async fn run(
        mut self,
        mut changes: broadcast::Receiver<Change>,
        routed: broadcast::Sender<Routed>,
    ) {
        loop {
            let first = match changes.recv().await {
                Ok(change) => change,
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "invalidation router fell behind; every node resynchronises"
                    );
                    let _ = routed.send(Routed {
                        invalidation: resync(),
                        audience: Audience::Every,
                    });
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match changes.try_recv() {
                    Ok(change) => batch.push(change),
                    // A lag here shows up at the next recv.
                    Err(_) => break,
                }
            }
            for (change, audience) in self.route(batch).await {
                let _ = routed.send(Routed {
                    invalidation: to_proto(change),
                    audience,
                });
            }
        }
    }

    /// Each change with its audience, in order; one lookup per agent, or
    /// one per namespace where the batch concerns several agents.
    async fn route(&mut self, batch: Vec<Change>) -> Vec<(Change, Audience)> {
        let mut agents_in: HashMap<&str, BTreeSet<Option<&str>>> = HashMap::new();
        for change in &batch {
            agents_in
                .entry(change.namespace.as_str())
                .or_default()
                .insert(change.agent.as_deref());
        }
        let mut listed: HashMap<String, Listed> = HashMap::new();
        for (ns, agents) in agents_in {
            if agents.len() > 1 {
                listed.insert(ns.to_owned(), self.pods.nodes_by_account(ns).await);
            }
        }
        let mut found: HashMap<(String, Option<String>), Audience> = HashMap::new();
        let mut out = Vec::with_capacity(batch.len());
        for change in batch {
            let key = (change.namespace.clone(), change.agent.clone());
            let audience = match found.get(&key) {
                Some(audience) => audience.clone(),
                None => {
                    let audience = self.audience(&change, listed.get(&change.namespace)).await;
                    found.insert(key, audience.clone());
                    audience
                }
            };
            if change.kind == ChangeKind::Deleted
                && change.grant.is_none()
                && let Some(agent) = &change.agent
            {
                self.service_accounts
                    .remove(&(change.namespace.clone(), agent.clone()));
            }
            out.push((change, audience));
        }
        out
    }

    async fn audience(&mut self, change: &Change, listed: Option<&Listed>) -> Audience {
        let ns = change.namespace.as_str();
        let accounts: Vec<String> = match &change.agent {
            Some(agent) => {
                let claimed = self.service_accounts.entry((ns.to_owned(), agent.clone()));
                let claimed = claimed.or_default();
                let identity: Option<Arc<AgentIdentity>> = self
                    .caches
                    .identities
                    .get(&ObjectRef::new(agent).within(ns));
                if let Some(identity) = identity {
                    claimed.insert(identity.spec.service_account_name.clone());
                }
                claimed.iter().cloned().collect()
            }
            None => Vec::new(),
        };
        match self.nodes_of(ns, &accounts, listed).await {
            Ok(nodes) => Audience::Nodes(Arc::new(nodes)),
            Err(error) => {
                tracing::warn!(
                    namespace = ns,
                    agent = change.agent.as_deref(),
                    %error,
                    "cannot list the agent's pods; the invalidation goes to every node"
                );
                Audience::Every
            }
        }
    }

    /// Nodes of the pods running as any of `accounts` in `ns`; with no
    /// ServiceAccount known (an identity deleted before this process saw
    /// it), every node with a pod in the namespace.
    async fn nodes_of(
        &self,
        ns: &str,
        accounts: &[String],
        listed: Option<&Listed>,
    ) -> Result<BTreeSet<String>, String> {
        if let Some(listed) = listed {
            let by_account = listed.as_ref().map_err(Clone::clone)?;
            return Ok(by_account
                .iter()
                .filter(|(sa, _)| accounts.is_empty() || accounts.contains(sa))
                .flat_map(|(_, nodes)| nodes.iter().cloned())
                .collect());
        }
        if accounts.is_empty() {
            return self.pods.nodes(ns, None).await;
        }
        let mut nodes = BTreeSet::new();
        for sa in accounts {
            nodes.extend(self.pods.nodes(ns, Some(sa)).await?);
        }
        Ok(nodes)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::api::{AgentIdentity, AgentIdentitySpec};
    use crate::digest::DigestKey;

    /// Pods by (namespace, ServiceAccount) → node; records every lookup.
    #[derive(Default)]
    struct Pods {
        placed: Vec<(&'static str, &'static str, &'static str)>,
        fail: bool,
        asked: Mutex<Vec<(String, Option<String>)>>,
    }

    impl Placement for Pods {
        async fn nodes(
            &self,
            namespace: &str,
            service_account: Option<&str>,
        ) -> Result<BTreeSet<String>, String> {
            if let Ok(mut asked) = self.asked.lock() {
                asked.push((namespace.to_owned(), service_account.map(str::to_owned)));
            }
            if self.fail {
                return Err("the API server is away".to_owned());
            }
            Ok(self
                .placed
                .iter()
                .filter(|(ns, sa, _)| *ns == namespace && service_account.is_none_or(|s| s == *sa))
                .map(|(_, _, node)| (*node).to_owned())
                .collect())
        }

        async fn nodes_by_account(
            &self,
            namespace: &str,
        ) -> Result<HashMap<String, BTreeSet<String>>, String> {
            if let Ok(mut asked) = self.asked.lock() {
                asked.push((namespace.to_owned(), Some("*".to_owned())));
            }
            if self.fail {
                return Err("the API server is away".to_owned());
            }
            let mut by_account: HashMap<String, BTreeSet<String>> = HashMap::new();
            for (_, sa, node) in self.placed.iter().filter(|(ns, _, _)| *ns == namespace) {
                by_account
                    .entry((*sa).to_owned())
                    .or_default()
                    .insert((*node).to_owned());
            }
            Ok(by_account)
        }
    }

    fn caches_with(identities: &[(&str, &str, &str)]) -> Caches {
        let (caches, mut writers) = crate::caches::new(DigestKey::from_bytes(&[3; 32]).unwrap());
        for (ns, name, sa) in identities {
            let mut identity = AgentIdentity::new(
                name,
                AgentIdentitySpec {
                    service_account_name: (*sa).to_owned(),
                    ..Default::default()
                },
            );
            identity.metadata.namespace = Some((*ns).to_owned());
            writers
                .identities
                .apply_watcher_event(&kube::runtime::watcher::Event::Apply(identity));
        }
        caches
    }

    fn change(kind: ChangeKind, ns: &str, agent: &str, grant: Option<&str>) -> Change {
        let mut c = Change::new(kind, ns);
        c.agent = Some(agent.to_owned());
        c.grant = grant.map(str::to_owned);
        c
    }

    fn nodes(audience: &Audience) -> Vec<String> {
        match audience {
            Audience::Every => vec!["*".to_owned()],
            Audience::Nodes(n) => n.iter().cloned().collect(),
        }
    }

    #[tokio::test]
    async fn a_change_goes_to_the_nodes_of_the_agents_pods_only() {
        let mut router = Router {
            pods: Pods {
                placed: vec![
                    ("team", "bot-sa", "node-a"),
                    ("team", "other-sa", "node-b"),
                    ("else", "bot-sa", "node-c"),
                ],
                ..Default::default()
            },
            caches: caches_with(&[("team", "bot", "bot-sa")]),
            service_accounts: HashMap::new(),
        };
        let routed = router
            .route(vec![
                change(ChangeKind::Revoked, "team", "bot", Some("g")),
                change(ChangeKind::Rotated, "team", "bot", Some("h")),
            ])
            .await;
        let audiences: Vec<Vec<String>> = routed.iter().map(|(_, a)| nodes(a)).collect();
        assert_eq!(audiences, [vec!["node-a"], vec!["node-a"]]);
        // One lookup for both changes of the agent.
        assert_eq!(router.pods.asked.lock().unwrap().len(), 1);
        assert!(Audience::Nodes(Arc::new(BTreeSet::from(["node-a".into()]))).includes("node-a"));
        assert!(!routed[0].1.includes("node-b"));
    }

    #[tokio::test]
    async fn a_deleted_identity_still_reaches_its_pods_and_unknown_ones_reach_the_namespace() {
        let mut router = Router {
            pods: Pods {
                placed: vec![("team", "bot-sa", "node-a"), ("team", "x-sa", "node-b")],
                ..Default::default()
            },
            caches: caches_with(&[("team", "bot", "bot-sa")]),
            service_accounts: HashMap::new(),
        };
        // Seen once while it existed, then deleted from the store.
        router
            .route(vec![change(ChangeKind::Changed, "team", "bot", None)])
            .await;
        router.caches = caches_with(&[]);
        let routed = router
            .route(vec![change(ChangeKind::Deleted, "team", "bot", None)])
            .await;
        assert_eq!(nodes(&routed[0].1), ["node-a"]);
        // Never seen: every node with a pod in the namespace.
        let routed = router
            .route(vec![change(ChangeKind::Deleted, "team", "ghost", None)])
            .await;
        assert_eq!(nodes(&routed[0].1), ["node-a", "node-b"]);
    }

    #[tokio::test]
    async fn a_batch_about_several_agents_of_a_namespace_lists_it_once() {
        let mut router = Router {
            pods: Pods {
                placed: vec![
                    ("team", "a-sa", "node-a"),
                    ("team", "b-sa", "node-b"),
                    ("team", "c-sa", "node-c"),
                ],
                ..Default::default()
            },
            caches: caches_with(&[("team", "a", "a-sa"), ("team", "b", "b-sa")]),
            service_accounts: HashMap::new(),
        };
        // A Secret granted to both agents rotated: one change per grant.
        let routed = router
            .route(vec![
                change(ChangeKind::Rotated, "team", "a", Some("ga")),
                change(ChangeKind::Rotated, "team", "b", Some("gb")),
                change(ChangeKind::Deleted, "team", "ghost", None),
            ])
            .await;
        let audiences: Vec<Vec<String>> = routed.iter().map(|(_, a)| nodes(a)).collect();
        assert_eq!(
            audiences,
            [
                vec!["node-a"],
                vec!["node-b"],
                vec!["node-a", "node-b", "node-c"]
            ]
        );
        assert_eq!(
            *router.pods.asked.lock().unwrap(),
            [("team".to_owned(), Some("*".to_owned()))]
        );
    }

    #[tokio::test]
    async fn a_failed_lookup_sends_to_every_node() {
        let mut router = Router {
            pods: Pods {
                fail: true,
                ..Default::default()
            },
            caches: caches_with(&[("team", "bot", "bot-sa")]),
            service_accounts: HashMap::new(),
        };
        let routed = router
            .route(vec![change(ChangeKind::Revoked, "team", "bot", Some("g"))])
            .await;
        assert_eq!(routed[0].1, Audience::Every);
    }
}
