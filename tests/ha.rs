//! Two controller replicas against one API server: exactly one reconciles,
//! the other takes over within the lease duration when the leader dies, and
//! custody answers from both.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::proxy::TcpProxy;
use common::stack::node_plugin_token;
use common::{
    AUDIENCE, ControllerProcess, client, create_node, create_pod, create_service_account,
    install_crds, pod_token, server, test_namespace, wait_for_desc,
};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, ObjectMeta, PostParams};
use scopehold::api::{
    AgentIdentity, AgentIdentitySpec, GrantPhase, GrantedKey, SecretGrant, SecretGrantSpec,
};
use scopehold::proto::scopehold::v1::ResolveRequest;
use scopehold::proto::scopehold::v1::custody_client::CustodyClient;

const LEASE_SECONDS: u64 = 4;

fn start(ns: &str) -> ControllerProcess {
    start_via(ns, &server().kubeconfig)
}

/// [`start`] reaching the API server through `kubeconfig` (e.g. a proxy's).
fn start_via(ns: &str, kubeconfig: &std::path::Path) -> ControllerProcess {
    ControllerProcess::start_with_kubeconfig(
        ns,
        &[
            "--leader-election",
            "--lease-namespace",
            ns,
            "--lease-duration-seconds",
            &LEASE_SECONDS.to_string(),
            "--custody-listen",
            "127.0.0.1:0",
            "--custody-plaintext",
            "--node-service-account",
            &format!("{ns}/node-plugin"),
        ],
        kubeconfig,
    )
}

fn field(c: &ControllerProcess, name: &str) -> String {
    let line = c
        .logs()
        .lines()
        .find(|l| l.contains(&format!("\"{name}\"")))
        .map(str::to_owned)
        .unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&line)
        .ok()
        .and_then(|v| v[name].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn leads(c: &ControllerProcess) -> bool {
    c.logs()
        .lines()
        .rfind(|l| l.contains("became the leader") || l.contains("lost leadership"))
        .is_some_and(|l| l.contains("became the leader"))
}

async fn metric(addr: &str, series: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

async fn grant(client: &kube::Client, ns: &str, name: &str) {
    let spec = SecretGrantSpec {
        agent: "bot".into(),
        secret_name: "creds".into(),
        keys: vec![GrantedKey {
            key: "api".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    Api::<SecretGrant>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &SecretGrant::new(name, spec))
        .await
        .unwrap();
}

async fn await_active(client: &kube::Client, ns: &str, name: &str, timeout: Duration) {
    let api: Api<SecretGrant> = Api::namespaced(client.clone(), ns);
    wait_for_desc(&format!("{name} Active"), timeout, async || {
        (api.get(name).await.ok()?.phase() == Some(GrantPhase::Active)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn one_leader_reconciles_the_other_takes_over_and_both_serve_custody() {
    let client = client().await;
    install_crds(&client).await;
    let ns = test_namespace(&client, "ha").await;
    let node = format!("{ns}-node");
    create_node(&client, &node).await;
    create_service_account(&client, &ns, "bot-sa").await;
    let plugin_token = node_plugin_token(&client, &ns, &node).await;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("creds".into()),
            ..Default::default()
        },
        string_data: Some([("api".to_owned(), "ha-value".to_owned())].into()),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let identity = AgentIdentity::new(
        "bot",
        AgentIdentitySpec {
            service_account_name: "bot-sa".into(),
            ..Default::default()
        },
    );
    Api::<AgentIdentity>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &identity)
        .await
        .unwrap();

    let a = start(&ns);
    let b = start(&ns);
    for c in [&a, &b] {
        c.wait_for_log(|l| l.contains("caches synced"), Duration::from_secs(20))
            .await;
    }
    wait_for_desc("a leader", Duration::from_secs(20), async || {
        (leads(&a) || leads(&b)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(leads(&a) ^ leads(&b), "exactly one leader");
    let (leader, follower) = if leads(&a) { (a, b) } else { (b, a) };

    grant(&client, &ns, "before").await;
    await_active(&client, &ns, "before", Duration::from_secs(20)).await;
    let writes = "scopehold_status_writes_total{kind=\"SecretGrant\"}";
    assert!(metric(&field(&leader, "metrics_addr"), writes).await >= 1.0);
    assert_eq!(
        metric(&field(&follower, "metrics_addr"), writes).await,
        0.0,
        "the follower wrote status"
    );

    // Custody answers on both replicas.
    let pod = create_pod(&client, &ns, "agent", "bot-sa", &node).await;
    let token = pod_token(
        &client,
        &ns,
        "bot-sa",
        "agent",
        &pod.uid().unwrap(),
        AUDIENCE,
        3600,
    )
    .await;
    for c in [&leader, &follower] {
        let mut custody = CustodyClient::connect(format!("http://{}", field(c, "custody_addr")))
            .await
            .unwrap();
        let mut request = tonic::Request::new(ResolveRequest {
            pod_token: token.clone(),
            pod_namespace: ns.clone(),
            pod_name: "agent".into(),
            pod_uid: pod.uid().unwrap(),
            service_account_name: "bot-sa".into(),
            node_name: node.clone(),
            ..Default::default()
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {plugin_token}").parse().unwrap(),
        );
        let response = custody
            .resolve(request)
            .await
            .expect("custody answers on every replica")
            .into_inner();
        assert_eq!(response.grants.len(), 1);
    }

    // The leader dies without releasing the lease: the follower takes over
    // within the lease duration (plus its renew period).
    let killed = Instant::now();
    leader.kill();
    wait_for_desc(
        "takeover",
        Duration::from_secs(LEASE_SECONDS * 3),
        async || leads(&follower).then_some(()),
    )
    .await;
    let takeover = killed.elapsed();
    eprintln!("takeover after {takeover:?} (lease {LEASE_SECONDS}s)");
    assert!(
        takeover <= Duration::from_secs(LEASE_SECONDS * 2),
        "takeover took {takeover:?}"
    );
    grant(&client, &ns, "after").await;
    await_active(&client, &ns, "after", Duration::from_secs(20)).await;
}

/// When the last log line containing `text` was written (its JSON timestamp).
fn logged_at(c: &ControllerProcess, text: &str) -> Option<k8s_openapi::jiff::Timestamp> {
    c.logs()
        .lines()
        .rfind(|l| l.contains(text))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["timestamp"].as_str()?.parse().ok())
}

/// A leader partitioned from the API server cannot renew its lease: it must stop
/// leading before the lease runs out, i.e. before the other replica may take it,
/// so that two replicas never reconcile at once. Back on the network it stays a
/// follower.
#[tokio::test]
async fn a_leader_cut_off_from_the_api_server_steps_down_before_the_lease_runs_out() {
    let client = client().await;
    install_crds(&client).await;
    let ns = test_namespace(&client, "ha-partition").await;
    let upstream: std::net::SocketAddr =
        server().url.trim_start_matches("https://").parse().unwrap();
    let proxies = [
        TcpProxy::start(upstream).await,
        TcpProxy::start(upstream).await,
    ];
    let [a, b] = [0, 1].map(|i| {
        start_via(
            &ns,
            &proxies[i].kubeconfig(&server().kubeconfig, &server().run_dir),
        )
    });
    wait_for_desc("a leader", Duration::from_secs(20), async || {
        (leads(&a) || leads(&b)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(leads(&a) ^ leads(&b), "exactly one leader");
    let (leader, follower, cable) = if leads(&a) {
        (&a, &b, &proxies[0])
    } else {
        (&b, &a, &proxies[1])
    };

    cable.cut();
    let cut = Instant::now();
    wait_for_desc(
        "the follower taking over",
        Duration::from_secs(LEASE_SECONDS * 4),
        async || leads(follower).then_some(()),
    )
    .await;
    eprintln!("follower leads {:?} after the cut", cut.elapsed());
    wait_for_desc(
        "the cut-off leader stepping down",
        Duration::from_secs(2),
        async || (!leads(leader)).then_some(()),
    )
    .await;
    let stepped_down = logged_at(leader, "lost leadership").unwrap();
    let took_over = logged_at(follower, "became the leader").unwrap();
    eprintln!("stepped down at {stepped_down}, taken over at {took_over}");
    assert!(
        stepped_down < took_over,
        "the cut-off leader led until {stepped_down}, after the follower took over at {took_over}"
    );
    assert!(
        leader.logs().contains("stepping down before it runs out"),
        "the leader should say why it stepped down"
    );

    // Back on the network, the old leader finds the lease held and follows.
    cable.restore();
    tokio::time::sleep(Duration::from_secs(LEASE_SECONDS * 2)).await;
    assert!(leads(follower) && !leads(leader), "leadership flapped back");
    grant(&client, &ns, "after-partition").await;
    // The grant names an agent that does not exist: the new leader still
    // reconciles it (to Pending), which is all this checks.
    let api: Api<SecretGrant> = Api::namespaced(client.clone(), &ns);
    wait_for_desc(
        "a reconcile by the new leader",
        Duration::from_secs(20),
        async || api.get("after-partition").await.ok()?.status.map(|_| ()),
    )
    .await;
}

/// Both replicas serve custody and count resolutions into the same grant
/// status: concurrent resolutions on both must all be counted (a replica that
/// wrote its own count over the other's lost them, and counts went backwards).
#[tokio::test]
async fn resolutions_on_two_replicas_are_all_counted() {
    let client = client().await;
    install_crds(&client).await;
    let ns = test_namespace(&client, "ha-count").await;
    let node = format!("{ns}-node");
    create_node(&client, &node).await;
    create_service_account(&client, &ns, "bot-sa").await;
    let plugin_token = node_plugin_token(&client, &ns, &node).await;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("creds".into()),
            ..Default::default()
        },
        string_data: Some([("api".to_owned(), "ha-count-value".to_owned())].into()),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let identity = AgentIdentity::new(
        "bot",
        AgentIdentitySpec {
            service_account_name: "bot-sa".into(),
            ..Default::default()
        },
    );
    Api::<AgentIdentity>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &identity)
        .await
        .unwrap();
    grant(&client, &ns, "counted").await;

    let replicas = [start(&ns), start(&ns)];
    for c in &replicas {
        c.wait_for_log(|l| l.contains("caches synced"), Duration::from_secs(20))
            .await;
    }
    await_active(&client, &ns, "counted", Duration::from_secs(20)).await;

    const PODS_PER_REPLICA: usize = 8;
    let mut asks = Vec::new();
    for i in 0..PODS_PER_REPLICA * 2 {
        let name = format!("agent-{i}");
        let pod = create_pod(&client, &ns, &name, "bot-sa", &node).await;
        let uid = pod.uid().unwrap();
        let token = pod_token(&client, &ns, "bot-sa", &name, &uid, AUDIENCE, 3600).await;
        asks.push((i % 2, name, uid, token));
    }
    // Rounds of one resolution per replica at the same moment, so that both
    // flush counts for the same grant again and again.
    for round in asks.chunks(2) {
        let calls = round.iter().map(|(replica, name, uid, token)| {
            let addr = field(&replicas[*replica], "custody_addr");
            let (ns, node, plugin_token) = (ns.clone(), node.clone(), plugin_token.clone());
            async move {
                let mut custody = CustodyClient::connect(format!("http://{addr}"))
                    .await
                    .unwrap();
                let mut request = tonic::Request::new(ResolveRequest {
                    pod_token: token.clone(),
                    pod_namespace: ns,
                    pod_name: name.clone(),
                    pod_uid: uid.clone(),
                    service_account_name: "bot-sa".into(),
                    node_name: node,
                    ..Default::default()
                });
                request.metadata_mut().insert(
                    "authorization",
                    format!("Bearer {plugin_token}").parse().unwrap(),
                );
                custody
                    .resolve(request)
                    .await
                    .expect("resolved")
                    .into_inner()
            }
        });
        for response in futures::future::join_all(calls).await {
            assert_eq!(response.grants.len(), 1);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    let api: Api<SecretGrant> = Api::namespaced(client.clone(), &ns);
    let total = i64::try_from(asks.len()).unwrap();
    let mut last = 0;
    let counted = wait_for_desc(
        &format!("{total} resolutions counted"),
        Duration::from_secs(20),
        async || {
            let count = api
                .get("counted")
                .await
                .ok()?
                .status?
                .resolutions
                .unwrap_or(0);
            assert!(count >= last, "the count went backwards: {last} -> {count}");
            last = count;
            (count >= total).then_some(count)
        },
    )
    .await;
    assert_eq!(counted, total, "resolutions counted twice");
    // And it stays there (no late write from a stale base).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = api.get("counted").await.unwrap().status.unwrap();
    assert_eq!(status.resolutions, Some(total));
    assert_eq!(status.recent_resolutions.len(), 10);
}
