//! What one resolution costs the API server, counted by the API server itself
//! (`apiserver_request_total` of this test binary's own kube-apiserver, which
//! no other test shares): one TokenReview per publish, no Pod read, and the
//! audit Events aggregated into a series per grant written a few times per
//! burst, every occurrence still counted. And nothing is lost on shutdown:
//! occurrences pending when the controller gets SIGTERM are written.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::objects::{create_grant, create_identity, create_secret, key};
use common::scrape::{self, Scrape, requests_between};
use common::stack::{node_plugin_token, start_controller_with_custody};
use common::{
    AUDIENCE, ControllerProcess, client, create_node, create_pod, create_service_account,
    install_crds, pod_token, test_namespace, wait_for_desc,
};
use futures::StreamExt;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::{Api, Client, ResourceExt};
use scopehold::api::{GrantPhase, SecretGrant};
use scopehold::proto::scopehold::v1::ResolveRequest;
use scopehold::proto::scopehold::v1::custody_client::CustodyClient;

const WAIT: Duration = Duration::from_secs(30);

/// The request counts are the whole API server's: the tests of this file
/// take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Setup {
    client: Client,
    ns: String,
    node: String,
    plugin_token: String,
    pods: Vec<(String, String, String)>,
}

/// A namespace with one Secret, one agent, one grant and `n` pods of the
/// agent (with their bound tokens) on one node.
async fn setup(prefix: &str, n: usize) -> Setup {
    let client = client().await;
    install_crds(&client).await;
    let ns = test_namespace(&client, prefix).await;
    let node = format!("{ns}-node");
    create_node(&client, &node).await;
    let plugin_token = node_plugin_token(&client, &ns, &node).await;
    create_secret(&client, &ns, "creds", &[("api", "budget-value")]).await;
    create_service_account(&client, &ns, "bot-sa").await;
    create_identity(&client, &ns, "bot", "bot-sa", false).await;
    create_grant(
        &client,
        &ns,
        "bot-creds",
        "bot",
        "creds",
        vec![key("api")],
        |_| {},
    )
    .await;
    let mut pods = Vec::new();
    for i in 0..n {
        let name = format!("agent-{i}");
        let pod = create_pod(&client, &ns, &name, "bot-sa", &node).await;
        let uid = pod.uid().unwrap();
        let token = pod_token(&client, &ns, "bot-sa", &name, &uid, AUDIENCE, 3600).await;
        pods.push((name, uid, token));
    }
    Setup {
        client,
        ns,
        node,
        plugin_token,
        pods,
    }
}

impl Setup {
    async fn await_active(&self) {
        let api: Api<SecretGrant> = Api::namespaced(self.client.clone(), &self.ns);
        wait_for_desc("grant Active", WAIT, async || {
            (api.get("bot-creds").await.ok()?.phase() == Some(GrantPhase::Active)).then_some(())
        })
        .await;
    }

    /// Resolves every pod through custody, 16 at a time, as node plugins do.
    async fn resolve_all(&self, custody: &str) {
        let results: Vec<Result<(), String>> = futures::stream::iter(&self.pods)
            .map(|(name, uid, token)| async move {
                let mut client = CustodyClient::connect(format!("http://{custody}"))
                    .await
                    .map_err(|e| e.to_string())?;
                let mut request = tonic::Request::new(ResolveRequest {
                    request_id: format!("budget-{name}"),
                    pod_token: token.clone(),
                    pod_namespace: self.ns.clone(),
                    pod_name: name.clone(),
                    pod_uid: uid.clone(),
                    service_account_name: "bot-sa".into(),
                    node_name: self.node.clone(),
                    volume_id: format!("csi-{uid}"),
                    grants: vec![],
                    fs_group: None,
                });
                request.metadata_mut().insert(
                    "authorization",
                    format!("Bearer {}", self.plugin_token).parse().unwrap(),
                );
                client
                    .resolve(request)
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("{name}: {s}"))
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(failed.is_empty(), "resolutions failed: {failed:?}");
    }

    /// The SecretResolved Events regarding the grant, and the occurrences
    /// they count (`series.count`, or 1 for an Event without a series).
    async fn resolved_series(&self) -> (Vec<K8sEvent>, i64) {
        let events: Vec<K8sEvent> = Api::<K8sEvent>::namespaced(self.client.clone(), &self.ns)
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some("SecretResolved")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("bot-creds")
            })
            .collect();
        let count = events
            .iter()
            .map(|e| e.series.as_ref().map_or(1, |s| i64::from(s.count)))
            .sum();
        (events, count)
    }
}

fn metrics_addr(controller: &ControllerProcess) -> String {
    let line = controller
        .logs()
        .lines()
        .find(|l| l.contains("metrics_addr"))
        .expect("metrics_addr line")
        .to_owned();
    serde_json::from_str::<serde_json::Value>(&line).unwrap()["metrics_addr"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_publish_costs_one_token_review_and_its_events_become_a_series() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const N: usize = 120;
    let s = setup("budget", N).await;
    let (controller, custody) = start_controller_with_custody(&s.ns, &[]).await;
    s.await_active().await;
    // Let the controller's start-up writes (statuses, GrantActivated) settle.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let before = scrape::apiserver(&s.client).await;
    s.resolve_all(&custody).await;
    let (events, occurrences) = wait_for_desc(
        "SecretResolved series counting every resolution",
        WAIT,
        async || {
            let (events, count) = s.resolved_series().await;
            (count >= N as i64).then_some((events, count))
        },
    )
    .await;
    let after = scrape::apiserver(&s.client).await;

    let reviews = requests_between(&before, &after, "POST", "tokenreviews");
    let pod_reads = requests_between(&before, &after, "GET", "pods");
    let event_writes = requests_between(&before, &after, "POST", "events")
        + requests_between(&before, &after, "PATCH", "events");
    println!(
        "{N} resolutions: {reviews} TokenReviews, {pod_reads} Pod GETs, {event_writes} Event writes, {} Events counting {occurrences}",
        events.len()
    );
    // The pod's token, once per publish. The plugin's own review is cached
    // for 10 s; the calls in flight before the first review returns each
    // send one (at most the concurrency, 16), which custody counts apart.
    let ours: Scrape = scrape::endpoint(&metrics_addr(&controller))
        .await
        .expect("controller /metrics");
    let plugin_reviews = ours.sum(
        "scopehold_custody_token_reviews_total",
        &[("token", "node_plugin")],
    );
    assert!(
        (1.0..=16.0).contains(&plugin_reviews),
        "{plugin_reviews} reviews of the node plugin's token"
    );
    assert_eq!(
        reviews - plugin_reviews,
        N as f64,
        "{reviews} TokenReviews for {N} resolutions"
    );
    assert_eq!(
        pod_reads, 0.0,
        "the token's node claims replace the Pod read"
    );
    assert_eq!(occurrences, N as i64, "every resolution is counted once");
    assert_eq!(
        events.len(),
        1,
        "one series per grant and content: {events:#?}"
    );
    let series = events[0].series.as_ref().expect("a series");
    assert_eq!(series.count, N as i32);
    assert!(
        events[0].related.as_ref().and_then(|r| r.kind.as_deref()) == Some("AgentIdentity"),
        "a grant-level series is related to the agent, not to one pod"
    );
    assert!(
        (1.0..=8.0).contains(&event_writes),
        "{event_writes} Event writes for {N} resolutions"
    );
    // Every decision is still one audit line, at once.
    let lines = controller
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "SecretResolved" && l["grant"] == "bot-creds")
        .count();
    assert_eq!(lines, N);

    // The custody metrics saw the same.
    let decided = ours.sum(
        "scopehold_custody_decisions_total",
        &[("result", "allowed"), ("reason", "Granted")],
    );
    assert_eq!(decided, N as f64, "{}", ours.text);
    assert_eq!(
        ours.sum("scopehold_custody_token_reviews_total", &[("token", "pod")]),
        N as f64
    );
    assert_eq!(ours.sum("scopehold_custody_pod_reads_total", &[]), 0.0);
    assert_eq!(
        ours.sum(
            "scopehold_custody_resolve_duration_seconds_count",
            &[("result", "allowed")]
        ),
        N as f64
    );
    assert_eq!(ours.sum("scopehold_event_occurrences_total", &[]), N as f64);
    controller.stop();
}

#[tokio::test]
async fn events_pending_at_shutdown_are_written() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const N: usize = 30;
    let s = setup("budget-stop", N).await;
    // An hour between flushes: only the shutdown flush can write them.
    let (controller, custody) =
        start_controller_with_custody(&s.ns, &["--event-flush-ms", "3600000"]).await;
    s.await_active().await;
    s.resolve_all(&custody).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (events, _) = s.resolved_series().await;
    assert!(events.is_empty(), "written before shutdown: {events:#?}");
    let logs = controller.stop();
    assert!(
        logs.contains("flushed Events and resolution statuses"),
        "{logs}"
    );
    let (events, occurrences) = s.resolved_series().await;
    assert_eq!(occurrences, N as i64, "{events:#?}");
    assert_eq!(events.len(), 1);
}
