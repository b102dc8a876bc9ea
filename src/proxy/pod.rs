//! The pod change of delivery mode `proxy`, made by one function for the
//! admission webhook and for `kubectl scopehold inject`: a native sidecar
//! (init container with `restartPolicy: Always`, first, so later init
//! containers and the agent start after its startup probe) that alone mounts
//! the CSI volume naming the proxy grants; a small memory volume it fills
//! for the agent; and the agent containers' proxy and CA environment.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIVolumeSource, Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    ExecAction, ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
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
/// The sidecar's own bound token (usage reports), in the sidecar only.
pub const TOKEN_VOLUME: &str = "scopehold-proxy-token";
pub const TOKEN_MOUNT: &str = "/var/run/secrets/scopehold.dev/proxy";

/// How the sidecar is run.
#[derive(Clone, Debug)]
pub struct SidecarSettings {
    /// The ScopeHold image (`/scopehold` inside).
    pub image: String,
    pub port: u16,
    /// Where the sidecar reports uses; none: audit lines only.
    pub usage: Option<UsageTarget>,
    /// PEM of extra CAs the sidecar trusts for upstream TLS (private APIs).
    /// Set by the cluster's operator only: a pod that could name its own
    /// CA (and, by hostAliases, its own address for a granted host) would
    /// have the sidecar hand the value to a server of its choosing.
    pub upstream_ca_pem: Option<String>,
}

/// The controller's usage endpoint and the CA of its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageTarget {
    pub url: String,
    pub ca_pem: String,
}

impl Default for SidecarSettings {
    fn default() -> Self {
        SidecarSettings {
            image: "ghcr.io/scopehold/scopehold:latest".into(),
            port: 15001,
            usage: None,
            upstream_ca_pem: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error("the pod has no spec")]
    NoSpec,
    #[error(
        "no AgentIdentity in namespace {namespace:?} claims ServiceAccount {service_account:?}"
    )]
    NoIdentity {
        namespace: String,
        service_account: String,
    },
    #[error("two AgentIdentities claim ServiceAccount {service_account:?}; neither resolves")]
    IdentityConflict { service_account: String },
    #[error(
        "agent {agent:?} has no active SecretGrant with delivery: proxy in namespace {namespace:?}; grant one before starting the pod"
    )]
    NoProxyGrants { agent: String, namespace: String },
    #[error(
        "the pod sets shareProcessNamespace: true, which would let the agent read the sidecar's memory and files (the values); remove it"
    )]
    SharedProcessNamespace,
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
    // With one process namespace, /proc/<sidecar>/root and /mem are open to
    // the agent's processes: the values would be one `cat` away.
    if spec.share_process_namespace == Some(true) {
        return Err(InjectError::SharedProcessNamespace);
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    let init = spec.init_containers.get_or_insert_with(Vec::new);
    for name in [VALUES_VOLUME, AGENT_VOLUME, TOKEN_VOLUME] {
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
    if settings.usage.is_some() {
        volumes.push(Volume {
            name: TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(crate::api::TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(3600),
                        path: "token".into(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let sidecar = sidecar_container(&rules_json, settings);
    init.insert(0, sidecar);
    let agent_env = agent_env(settings);
    let agents = spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten().skip(1));
    for c in agents {
        let envs = c.env.get_or_insert_with(Vec::new);
        for (name, value) in &agent_env {
            // The pod's own setting is replaced: a proxy variable pointing
            // elsewhere would bypass injection (and the allow-list).
            envs.retain(|e| e.name != *name);
            envs.push(plain_env(name, value));
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

/// The sidecar container as `inject` adds it; custody compares a pod's
/// sidecar with this before it hands out proxy grants.
pub fn sidecar_container(rules_json: &str, settings: &SidecarSettings) -> Container {
    let listen = format!("127.0.0.1:{}", settings.port);
    let mut sidecar_env = vec![
        plain_env("SCOPEHOLD_PROXY_RULES", rules_json),
        plain_env("SCOPEHOLD_PROXY_LISTEN", &listen),
        plain_env("SCOPEHOLD_PROXY_VALUES_DIR", SIDECAR_VALUES),
        plain_env("SCOPEHOLD_PROXY_AGENT_DIR", SIDECAR_AGENT),
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
    ];
    let mut sidecar_mounts = vec![
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
    ];
    if let Some(pem) = &settings.upstream_ca_pem {
        sidecar_env.push(plain_env("SCOPEHOLD_PROXY_UPSTREAM_CA_PEM", pem));
    }
    if let Some(usage) = &settings.usage {
        sidecar_env.push(plain_env("SCOPEHOLD_PROXY_USAGE_URL", &usage.url));
        sidecar_env.push(plain_env("SCOPEHOLD_PROXY_USAGE_CA", &usage.ca_pem));
        sidecar_env.push(plain_env(
            "SCOPEHOLD_PROXY_TOKEN_FILE",
            &format!("{TOKEN_MOUNT}/token"),
        ));
        sidecar_mounts.push(VolumeMount {
            name: TOKEN_VOLUME.into(),
            mount_path: TOKEN_MOUNT.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(settings.image.clone()),
        args: Some(vec!["proxy".into()]),
        restart_policy: Some("Always".into()),
        env: Some(sidecar_env),
        volume_mounts: Some(sidecar_mounts),
        // Its own user, no privileges: nothing in the agent's containers
        // shares its identity.
        security_context: Some(SecurityContext {
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
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
    }
}

fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// The proxy and CA variables of the agent containers.
fn agent_env(settings: &SidecarSettings) -> Vec<(&'static str, String)> {
    let proxy_url = format!("http://127.0.0.1:{}", settings.port);
    let bundle = format!("{AGENT_MOUNT}/{}", super::BUNDLE_FILE);
    vec![
        ("HTTPS_PROXY", proxy_url.clone()),
        ("HTTP_PROXY", proxy_url.clone()),
        // curl and others read only the lower-case names.
        ("https_proxy", proxy_url.clone()),
        ("http_proxy", proxy_url),
        ("NO_PROXY", "localhost,127.0.0.1".into()),
        ("no_proxy", "localhost,127.0.0.1".into()),
        ("SSL_CERT_FILE", bundle.clone()),
        ("NODE_EXTRA_CA_CERTS", bundle.clone()),
        ("REQUESTS_CA_BUNDLE", bundle.clone()),
        ("CURL_CA_BUNDLE", bundle.clone()),
        ("GIT_SSL_CAINFO", bundle),
        (
            "SCOPEHOLD_PLACEHOLDERS",
            format!("{AGENT_MOUNT}/placeholders"),
        ),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("encoding the changed pod: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the changed pod lacks {0}")]
    Missing(&'static str),
}

/// The RFC 6902 patch the webhook returns: the change `inject` made to
/// `after`, expressed against the pod as the API server sent it (`raw`).
/// Only additions and the agents' `env` lists are written, so fields of the
/// pod that our Kubernetes types do not know survive untouched.
pub fn admission_patch(
    raw: &serde_json::Value,
    after: &Pod,
    settings: &SidecarSettings,
) -> Result<serde_json::Value, PatchError> {
    use serde_json::{Value, json};
    let a = serde_json::to_value(after)?;
    let add = |path: String, value: Value| json!({"op": "add", "path": path, "value": value});
    let mut ops = Vec::new();
    let injected = a
        .pointer("/metadata/annotations")
        .and_then(|v| v.get(INJECTED_ANNOTATION))
        .ok_or(PatchError::Missing("the injected annotation"))?;
    if raw
        .pointer("/metadata/annotations")
        .is_some_and(Value::is_object)
    {
        let key = INJECTED_ANNOTATION.replace('~', "~0").replace('/', "~1");
        ops.push(add(
            format!("/metadata/annotations/{key}"),
            injected.clone(),
        ));
    } else {
        let mut only = serde_json::Map::new();
        only.insert(INJECTED_ANNOTATION.into(), injected.clone());
        ops.push(add("/metadata/annotations".into(), Value::Object(only)));
    }
    let new_volumes: Vec<Value> = a
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| {
            [VALUES_VOLUME, AGENT_VOLUME, TOKEN_VOLUME]
                .iter()
                .any(|n| v["name"] == *n)
        })
        .cloned()
        .collect();
    if raw.pointer("/spec/volumes").is_some_and(Value::is_array) {
        for v in new_volumes {
            ops.push(add("/spec/volumes/-".into(), v));
        }
    } else {
        ops.push(add("/spec/volumes".into(), Value::Array(new_volumes)));
    }
    let sidecar = a
        .pointer("/spec/initContainers/0")
        .filter(|c| c["name"] == SIDECAR_NAME)
        .ok_or(PatchError::Missing("the sidecar"))?
        .clone();
    if raw
        .pointer("/spec/initContainers")
        .is_some_and(Value::is_array)
    {
        ops.push(add("/spec/initContainers/0".into(), sidecar));
    } else {
        ops.push(add("/spec/initContainers".into(), json!([sidecar])));
    }
    let names: Vec<&str> = agent_env(settings).iter().map(|(n, _)| *n).collect();
    // Init containers move one place down behind the sidecar.
    for (list, offset) in [("containers", 0), ("initContainers", 1)] {
        let raw_list = raw
            .pointer(&format!("/spec/{list}"))
            .and_then(Value::as_array);
        for (i, container) in raw_list.into_iter().flatten().enumerate() {
            let at = format!("/spec/{list}/{}", i + offset);
            let changed = a
                .pointer(&at)
                .ok_or(PatchError::Missing("an agent container"))?;
            let is_ours = |e: &&Value| e["name"].as_str().is_some_and(|n| names.contains(&n));
            let env: Vec<Value> = container["env"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| !is_ours(e))
                .chain(
                    changed["env"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(is_ours),
                )
                .cloned()
                .collect();
            ops.push(add(format!("{at}/env"), Value::Array(env)));
            let mount = changed["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["name"] == AGENT_VOLUME)
                .ok_or(PatchError::Missing("the agent volume mount"))?
                .clone();
            if container["volumeMounts"].is_array() {
                ops.push(add(format!("{at}/volumeMounts/-"), mount));
            } else {
                ops.push(add(format!("{at}/volumeMounts"), json!([mount])));
            }
        }
    }
    Ok(Value::Array(ops))
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
        // The webhook's patch, applied to the pod as sent, gives the same
        // pod, and keeps what our types do not know.
        let mut raw = serde_json::to_value(pod()).unwrap();
        raw["spec"]["containers"][0]["futureField"] = "kept".into();
        let patch = admission_patch(&raw, &out, &SidecarSettings::default()).unwrap();
        let mut patched = raw.clone();
        apply(&mut patched, &patch);
        assert_eq!(patched["spec"]["containers"][0]["futureField"], "kept");
        patched["spec"]["containers"][0]
            .as_object_mut()
            .unwrap()
            .remove("futureField");
        assert_eq!(patched, serde_json::to_value(&out).unwrap());
    }

    /// RFC 6902 `add` (the only op the webhook uses), for the test.
    fn apply(doc: &mut serde_json::Value, patch: &serde_json::Value) {
        for op in patch.as_array().unwrap() {
            assert_eq!(op["op"], "add");
            let path = op["path"].as_str().unwrap();
            let (parent, last) = path.rsplit_once('/').unwrap();
            let last = last.replace("~1", "/").replace("~0", "~");
            let target = doc.pointer_mut(parent).unwrap();
            let value = op["value"].clone();
            match target {
                serde_json::Value::Array(items) if last == "-" => items.push(value),
                serde_json::Value::Array(items) => items.insert(last.parse().unwrap(), value),
                serde_json::Value::Object(map) => {
                    map.insert(last, value);
                }
                other => panic!("cannot add into {other}"),
            }
        }
    }

    #[test]
    fn a_shared_process_namespace_is_refused() {
        let mut shared = pod();
        shared.spec.as_mut().unwrap().share_process_namespace = Some(true);
        assert_eq!(
            inject(&shared, &rules(), &SidecarSettings::default()),
            Err(InjectError::SharedProcessNamespace)
        );
    }

    #[test]
    fn usage_reports_use_a_token_only_the_sidecar_mounts() {
        let settings = SidecarSettings {
            usage: Some(UsageTarget {
                url: "https://c.ns.svc:9444/usage".into(),
                ca_pem: "PEM".into(),
            }),
            ..Default::default()
        };
        let out = inject(&pod(), &rules(), &settings).unwrap();
        let spec = out.spec.as_ref().unwrap();
        let token = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == TOKEN_VOLUME)
            .unwrap();
        let projection = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
            .service_account_token
            .as_ref()
            .unwrap();
        assert_eq!(projection.audience.as_deref(), Some("scopehold.dev"));
        let mounting: Vec<_> = spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .filter(|c| {
                c.volume_mounts
                    .iter()
                    .flatten()
                    .any(|m| m.name == TOKEN_VOLUME)
            })
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(mounting, [SIDECAR_NAME]);
        let mut raw = serde_json::to_value(pod()).unwrap();
        let patch = admission_patch(&raw, &out, &settings).unwrap();
        apply(&mut raw, &patch);
        assert_eq!(raw, serde_json::to_value(&out).unwrap());
    }

    #[test]
    fn the_operators_upstream_ca_reaches_the_sidecar_only() {
        let settings = SidecarSettings {
            upstream_ca_pem: Some("-----BEGIN CERTIFICATE-----\nX\n".into()),
            ..Default::default()
        };
        let out = inject(&pod(), &rules(), &settings).unwrap();
        let spec = out.spec.as_ref().unwrap();
        let with_ca: Vec<_> = spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .filter(|c| {
                c.env.iter().flatten().any(|e| {
                    e.name == "SCOPEHOLD_PROXY_UPSTREAM_CA_PEM"
                        && e.value == settings.upstream_ca_pem
                })
            })
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(with_ca, [SIDECAR_NAME]);
        let without = inject(&pod(), &rules(), &SidecarSettings::default()).unwrap();
        assert!(
            !serde_json::to_string(&without)
                .unwrap()
                .contains("UPSTREAM_CA")
        );
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
