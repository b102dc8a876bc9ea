//! What the benchmarks share: an admin client for the benchmark's own API
//! server, the CRDs, object metadata, CPU time of a process and the mounts
//! left below a directory. Each benchmark includes this file with
//! `#[path = "support/mod.rs"] mod support;` (it is not an example itself).

#![allow(dead_code)]

pub mod timing;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config, CustomResourceExt, ResourceExt};
use scopehold::api::{AgentIdentity, SecretGrant};
use scopehold::csi::volume::mounter::parse_mountinfo;

/// A client from the kubeconfig the test API server wrote.
pub async fn client_for(kubeconfig: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    Client::try_from(config).expect("client")
}

/// Applies both CRDs and waits until they are Established.
pub async fn install_crds(client: &Client, timeout: Duration) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [AgentIdentity::crd(), SecretGrant::crd()] {
        let name = crd.name_any();
        api.patch(
            &name,
            &PatchParams::apply("scopehold-bench").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("apply CRD");
        tokio::time::timeout(
            timeout,
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .expect("CRD Established")
        .expect("watching CRD");
    }
}

pub fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        ..Default::default()
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User and system CPU seconds a process has used so far (0 when it is gone).
pub fn cpu_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) / clock_ticks(), ticks(12) / clock_ticks())
}

/// User + system CPU seconds a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// Mount points below `root`, deepest first.
pub fn mounts_below(root: &Path) -> Vec<PathBuf> {
    let text = std::fs::read("/proc/self/mountinfo").expect("mountinfo");
    let mut points: Vec<PathBuf> = parse_mountinfo(&text)
        .expect("parse mountinfo")
        .into_iter()
        .map(|e| e.mount_point)
        .filter(|p| p.starts_with(root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}
