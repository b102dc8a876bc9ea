//! The pod change of delivery mode `proxy`, made by one function for the
//! admission webhook and for `kubectl scopehold inject`: a native sidecar
//! (init container with `restartPolicy: Always`, first, so later init
//! containers and the agent start after its startup probe) that alone mounts
//! the CSI volume naming the proxy grants; a small memory volume it fills
//! for the agent; and the agent containers' proxy and CA environment.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
    ObjectFieldSelector, Pod, Probe, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::rules::ProxyRules;

/// The annotation a pod sets to ask for the sidecar.
pub const INJECT_ANNOTATION: &str = "scopehold.dev/inject";
/// Set on a pod once changed, so a second pass changes nothing.
pub const INJECTED_ANNOTATION: &str = "scopehold.dev/injected";
pub const SIDECAR_NAME: &str = "scopehold-proxy";
pub const VALUES_VOLUME: &str = "scopehold-proxy-values";
pub const AGENT_VOLUME: &str = "scopehold-proxy-agent";
/// Where the agent finds its placeholders and CA bundle.
pub const AGENT_MOUNT: &str = "/var/run/scopehold";
const SIDECAR_VALUES: &str = "/var/run/scopehold/values";
const SIDECAR_AGENT: &str = "/var/run/scopehold/agent";
pub const CSI_DRIVER: &str = "csi.scopehold.dev";

/// How the sidecar is run.
#[derive(Clone, Debug)]
pub struct SidecarSettings {
    /// The ScopeHold image (`/scopehold` inside).
    pub image: String,
    pub port: u16,
}

impl Default for SidecarSettings {
    fn default() -> Self {
        SidecarSettings {
            image: "ghcr.io/scopehold/scopehold:latest".into(),
            port: 15001,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error("the pod has no spec")]
    NoSpec,
    #[error(
        "agent {agent:?} has no active SecretGrant with delivery: proxy in namespace {namespace:?}; grant one before starting the pod"
    )]
    NoProxyGrants { agent: String, namespace: String },
    #[error("the pod already has a volume or container named {0:?}")]
    NameTaken(String),
    #[error("rendering the proxy rules: {0}")]
    Rules(String),
}

/// Whether the pod asks for the sidecar and does not have it yet.
pub fn wants_injection(pod: &Pod) -> bool {
    let annotations = pod.metadata.annotations.as_ref();
    annotations
        .and_then(|a| a.get(INJECT_ANNOTATION))
        .is_some_and(|v| v == "proxy")
        && annotations
            .and_then(|a| a.get(INJECTED_ANNOTATION))
            .is_none()
}

/// The changed pod. Already-injected pods come back unchanged.
pub fn inject(
    pod: &Pod,
    rules: &ProxyRules,
    settings: &SidecarSettings,
) -> Result<Pod, InjectError> {
    let mut pod = pod.clone();
    if pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION))
    {
        return Ok(pod);
    }
    if rules.grants.is_empty() {
        return Err(InjectError::NoProxyGrants {
            agent: rules.agent.clone(),
            namespace: rules.namespace.clone(),
        });
    }
    let rules_json = serde_json::to_string(rules).map_err(|e| InjectError::Rules(e.to_string()))?;
    let spec = pod.spec.as_mut().ok_or(InjectError::NoSpec)?;
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    let init = spec.init_containers.get_or_insert_with(Vec::new);
    for name in [VALUES_VOLUME, AGENT_VOLUME] {
        if volumes.iter().any(|v| v.name == name) {
            return Err(InjectError::NameTaken(name.into()));
        }
    }
    if init
        .iter()
        .chain(spec.containers.iter())
        .any(|c| c.name == SIDECAR_NAME)
    {
        return Err(InjectError::NameTaken(SIDECAR_NAME.into()));
    }
    let grant_names = rules
        .grants
        .iter()
        .map(|g| g.grant.as_str())
        .collect::<Vec<_>>()
        .join(",");
    volumes.push(Volume {
        name: VALUES_VOLUME.into(),
        csi: Some(CSIVolumeSource {
            driver: CSI_DRIVER.into(),
            read_only: Some(true),
            // Naming the grants is what makes custody hand out proxy grants
            // (a plain volume never receives them).
            volume_attributes: Some(BTreeMap::from([("grants".to_string(), grant_names)])),
            ..Default::default()
        }),
        ..Default::default()
    });
    volumes.push(Volume {
        name: AGENT_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity("4Mi".into())),
        }),
        ..Default::default()
    });
    let listen = format!("127.0.0.1:{}", settings.port);
    let env = |name: &str, value: &str| EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    };
    let sidecar = Container {
        name: SIDECAR_NAME.into(),
        image: Some(settings.image.clone()),
        args: Some(vec!["proxy".into()]),
        restart_policy: Some("Always".into()),
        env: Some(vec![
            env("SCOPEHOLD_PROXY_RULES", &rules_json),
            env("SCOPEHOLD_PROXY_LISTEN", &listen),
            env("SCOPEHOLD_PROXY_VALUES_DIR", SIDECAR_VALUES),
            env("SCOPEHOLD_PROXY_AGENT_DIR", SIDECAR_AGENT),
            EnvVar {
                name: "POD_NAME".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]),
        volume_mounts: Some(vec![
            VolumeMount {
                name: VALUES_VOLUME.into(),
                mount_path: SIDECAR_VALUES.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: AGENT_VOLUME.into(),
                mount_path: SIDECAR_AGENT.into(),
                ..Default::default()
            },
        ]),
        // The probe runs in the sidecar's network namespace (the pod's), so
        // it reaches the loopback listener; kubelet starts the next
        // containers only after it passes, when the agent's files exist.
        startup_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec![
                    "/scopehold".into(),
                    "proxy-ready".into(),
                    "--addr".into(),
                    listen.clone(),
                ]),
            }),
            period_seconds: Some(1),
            failure_threshold: Some(60),
            ..Default::default()
        }),
        ..Default::default()
    };
    init.insert(0, sidecar);
    let proxy_url = format!("http://{listen}");
    let bundle = format!("{AGENT_MOUNT}/{}", super::BUNDLE_FILE);
    let agent_env = [
        ("HTTPS_PROXY", proxy_url.as_str()),
        ("HTTP_PROXY", proxy_url.as_str()),
        // curl and others read only the lower-case names.
        ("https_proxy", proxy_url.as_str()),
        ("http_proxy", proxy_url.as_str()),
        ("NO_PROXY", "localhost,127.0.0.1"),
        ("no_proxy", "localhost,127.0.0.1"),
        ("SSL_CERT_FILE", bundle.as_str()),
        ("NODE_EXTRA_CA_CERTS", bundle.as_str()),
        ("REQUESTS_CA_BUNDLE", bundle.as_str()),
        ("CURL_CA_BUNDLE", bundle.as_str()),
        ("GIT_SSL_CAINFO", bundle.as_str()),
        (
            "SCOPEHOLD_PLACEHOLDERS",
            &format!("{AGENT_MOUNT}/placeholders"),
        ),
    ];
    let agents = spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten().skip(1));
    for c in agents {
        let envs = c.env.get_or_insert_with(Vec::new);
        for (name, value) in agent_env {
            // The pod's own setting is replaced: a proxy variable pointing
            // elsewhere would bypass injection (and the allow-list).
            envs.retain(|e| e.name != name);
            envs.push(env(name, value));
        }
        c.volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name: AGENT_VOLUME.into(),
                mount_path: AGENT_MOUNT.into(),
                read_only: Some(true),
                ..Default::default()
            });
    }
    pod.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(INJECTED_ANNOTATION.into(), "proxy".into());
    Ok(pod)
}

/// An RFC 6902 patch from `before` to `after` for the fields `inject`
/// changes (what the webhook returns).
pub fn json_patch(before: &Pod, after: &Pod) -> Result<serde_json::Value, serde_json::Error> {
    let b = serde_json::to_value(before)?;
    let a = serde_json::to_value(after)?;
    let mut ops = Vec::new();
    let fields = [
        (
            "/metadata/annotations",
            &b["metadata"]["annotations"],
            &a["metadata"]["annotations"],
        ),
        (
            "/spec/volumes",
            &b["spec"]["volumes"],
            &a["spec"]["volumes"],
        ),
        (
            "/spec/initContainers",
            &b["spec"]["initContainers"],
            &a["spec"]["initContainers"],
        ),
        (
            "/spec/containers",
            &b["spec"]["containers"],
            &a["spec"]["containers"],
        ),
    ];
    for (path, old, new) in fields {
        if old == new {
            continue;
        }
        let op = if old.is_null() { "add" } else { "replace" };
        ops.push(serde_json::json!({"op": op, "path": path, "value": new}));
    }
    Ok(serde_json::Value::Array(ops))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::KeyProxy;
    use crate::api::delivery::HeaderTemplate;
    use crate::proxy::rules::{GrantRules, KeyRules};
    use k8s_openapi::api::core::v1::PodSpec;

    fn rules() -> ProxyRules {
        ProxyRules {
            namespace: "ns".into(),
            agent: "coder".into(),
            grants: vec![GrantRules {
                grant: "openai".into(),
                secret: "llm".into(),
                keys: vec![KeyRules {
                    key: "api-key".into(),
                    file: "api-key".into(),
                    proxy: KeyProxy {
                        hosts: vec!["api.openai.com".into()],
                        header: Some(HeaderTemplate {
                            name: "Authorization".into(),
                            template: "Bearer {value}".into(),
                        }),
                        ..Default::default()
                    },
                }],
            }],
            egress_allow_list: None,
        }
    }

    fn pod() -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("agent".into()),
                annotations: Some(BTreeMap::from([(INJECT_ANNOTATION.into(), "proxy".into())])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "agent".into(),
                    env: Some(vec![EnvVar {
                        name: "HTTPS_PROXY".into(),
                        value: Some("http://elsewhere:3128".into()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_agent_never_mounts_the_values() {
        assert!(wants_injection(&pod()));
        let out = inject(&pod(), &rules(), &SidecarSettings::default()).unwrap();
        assert!(!wants_injection(&out));
        let spec = out.spec.as_ref().unwrap();
        let sidecar = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        let agent = &spec.containers[0];
        let mounts: Vec<_> = agent
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(mounts, [AGENT_VOLUME]);
        let proxy: Vec<_> = agent
            .env
            .iter()
            .flatten()
            .filter(|e| e.name == "HTTPS_PROXY")
            .collect();
        assert_eq!(proxy.len(), 1);
        assert_eq!(proxy[0].value.as_deref(), Some("http://127.0.0.1:15001"));
        let csi = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == VALUES_VOLUME)
            .and_then(|v| v.csi.as_ref())
            .unwrap();
        assert_eq!(csi.volume_attributes.as_ref().unwrap()["grants"], "openai");
        // Idempotent.
        assert_eq!(
            inject(&out, &rules(), &SidecarSettings::default()).unwrap(),
            out
        );
        let patch = json_patch(&pod(), &out).unwrap();
        assert_eq!(patch.as_array().unwrap().len(), 4);
    }

    #[test]
    fn no_proxy_grant_is_a_clear_error() {
        let empty = ProxyRules {
            grants: vec![],
            ..rules()
        };
        let err = inject(&pod(), &empty, &SidecarSettings::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("no active SecretGrant with delivery: proxy")
        );
    }
}
