//! API server outages fail fast and loud: with the API server hanging, custody
//! answers a Resolve UNAVAILABLE within its (configurable) decision timeout
//! instead of holding the publish; with the API server unreachable, the
//! controller warns, exports `scopehold_watch_down` and fails `/readyz` until
//! its watches recover. The controller reaches the API server through a
//! loopback TCP proxy the test controls.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::objects::{create_grant, create_identity, create_secret, key};
use common::proxy::TcpProxy;
use common::stack::{node_plugin_token, start_controller_with_custody_via};
use common::{
    AUDIENCE, client, create_node, create_pod, create_service_account, install_crds, pod_token,
    server, test_namespace, wait_for_desc,
};
use kube::ResourceExt;
use scopehold::proto::scopehold::v1::ResolveRequest;
use scopehold::proto::scopehold::v1::custody_client::CustodyClient;
use tonic::Code;

/// `GET path` on the controller's HTTP listener: (status code, body).
async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// The value of one metric series, if exported.
fn series(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test]
async fn a_hanging_api_server_gets_a_prompt_unavailable_and_a_lost_one_a_loud_controller() {
    let client = client().await;
    install_crds(&client).await;
    let ns = test_namespace(&client, "outage").await;
    let node = format!("{ns}-node");
    create_node(&client, &node).await;
    create_service_account(&client, &ns, "bot-sa").await;
    let plugin_token = node_plugin_token(&client, &ns, &node).await;
    create_secret(&client, &ns, "creds", &[("api", "outage-value")]).await;
    create_identity(&client, &ns, "bot", "bot-sa", false).await;
    create_grant(&client, &ns, "g", "bot", "creds", vec![key("api")], |_| {}).await;
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

    let upstream = server().url.trim_start_matches("https://").parse().unwrap();
    let proxy = TcpProxy::start(upstream).await;
    let kubeconfig = proxy.kubeconfig(&server().kubeconfig, &server().run_dir);
    let (controller, custody) = start_controller_with_custody_via(
        &ns,
        &["--custody-decision-timeout-ms", "2000"],
        &kubeconfig,
    )
    .await;
    let line = controller
        .wait_for_log(|l| l.contains("metrics_addr"), Duration::from_secs(5))
        .await;
    let http = serde_json::from_str::<serde_json::Value>(&line).unwrap()["metrics_addr"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_desc("ready", Duration::from_secs(20), async || {
        (http_get(&http, "/readyz").await.0 == 200).then_some(())
    })
    .await;

    let resolve = || {
        let (custody, token, ns, node, plugin_token, uid) = (
            custody.clone(),
            token.clone(),
            ns.clone(),
            node.clone(),
            plugin_token.clone(),
            pod.uid().unwrap(),
        );
        async move {
            let mut client = CustodyClient::connect(format!("http://{custody}"))
                .await
                .unwrap();
            let mut request = tonic::Request::new(ResolveRequest {
                pod_token: token,
                pod_namespace: ns,
                pod_name: "agent".into(),
                pod_uid: uid,
                service_account_name: "bot-sa".into(),
                node_name: node,
                ..Default::default()
            });
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {plugin_token}").parse().unwrap(),
            );
            client.resolve(request).await
        }
    };
    // The grant resolves while the API server answers.
    wait_for_desc("a first resolution", Duration::from_secs(20), async || {
        resolve().await.ok()
    })
    .await;

    // The API server hangs: custody cannot verify the pod, and says so at once.
    proxy.stall();
    let asked = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(12), resolve())
        .await
        .expect("custody held the Resolve while the API server hung");
    let took = asked.elapsed();
    eprintln!("UNAVAILABLE after {took:?} (decision timeout 2 s)");
    let status = answer.expect_err("nothing can be decided without the API server");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("could not decide"), "{status:?}");

    // The API server is gone: the watches fail, and the controller says so.
    proxy.cut();
    let (code, body) = wait_for_desc("readyz failing", Duration::from_secs(30), async || {
        let (code, body) = http_get(&http, "/readyz").await;
        (code == 503).then_some((code, body))
    })
    .await;
    assert!(body.contains("watches down"), "{code} {body}");
    let metrics = http_get(&http, "/metrics").await.1;
    for resource in ["secrets", "secretgrants", "agentidentities"] {
        let name = format!("scopehold_watch_down{{resource=\"{resource}\"}}");
        wait_for_desc(
            &format!("{resource} watch down"),
            Duration::from_secs(30),
            async || {
                (series(&http_get(&http, "/metrics").await.1, &name) == Some(1.0)).then_some(())
            },
        )
        .await;
    }
    assert!(metrics.contains("scopehold_watch_down"), "{metrics}");
    controller
        .wait_for_log(
            |l| l.contains("\"level\":\"WARN\"") && l.contains("watch failing"),
            Duration::from_secs(5),
        )
        .await;

    // Back: the watches recover (after their backoff) and readiness returns.
    proxy.restore();
    wait_for_desc("ready again", Duration::from_secs(90), async || {
        (http_get(&http, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    let metrics = http_get(&http, "/metrics").await.1;
    assert_eq!(
        series(&metrics, "scopehold_watch_down{resource=\"secretgrants\"}"),
        Some(0.0),
        "{metrics}"
    );
    resolve().await.expect("resolves again");
}
