//! Proxy grants go only to ScopeHold's own sidecar. A volume names the
//! grants it wants (`volumeAttributes.grants`), and anyone who may create
//! pods for the agent's ServiceAccount can write such a volume: into the
//! agent's own container, or beside a "sidecar" of their making whose rules
//! send the value to another host or trust another CA. So before custody
//! hands out a proxy grant it reads the pod and requires:
//!
//! - no shared process namespace (the agent could read the sidecar's memory);
//! - every volume naming the grants is mounted by one container only: the
//!   native sidecar `scopehold-proxy`, never by an agent or ephemeral
//!   container;
//! - that container is exactly what the webhook and `kubectl scopehold
//!   inject` render with this controller's settings (image, command, args,
//!   environment, mounts, security context), and its rules for the
//!   requested grants are the grants' current ones.
//!
//! A grant whose hosts or injection changed after the pod started no longer
//! matches: the pod loses the grant until it is recreated, rather than keep
//! injecting under rules the grant no longer states.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, VolumeMount};

use crate::proxy::pod::{CSI_DRIVER, SIDECAR_NAME, SidecarSettings, sidecar_container};
use crate::proxy::rules::{GrantRules, ProxyRules};

/// Why a pod may not receive proxy grants; the message names what differs,
/// never a value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyPodError {
    #[error("the pod shares its process namespace; proxy grants go only to pods that do not")]
    SharedProcessNamespace,
    #[error("no csi.scopehold.dev volume of the pod names the proxy grants {0:?}")]
    NoValuesVolume(Vec<String>),
    #[error(
        "container {0:?} mounts the volume of proxy grants or targets the sidecar; only the injected {SIDECAR_NAME:?} sidecar may mount it"
    )]
    MountedByOther(String),
    #[error("no container mounts the volume of proxy grants")]
    NotMounted,
    #[error(
        "the {SIDECAR_NAME:?} container differs from the injected sidecar in its {0}; inject it with the webhook or `kubectl scopehold inject` using this controller's settings"
    )]
    NotTheSidecar(&'static str),
    #[error(
        "the sidecar's rules for SecretGrant {0:?} are not the grant's current ones; recreate the pod"
    )]
    StaleRules(String),
}

/// Checks `pod` before proxy grants `requested` go to it; `current` holds
/// the grants' rules now (any order, at least the requested ones).
pub fn check(
    pod: &Pod,
    requested: &[String],
    current: &[GrantRules],
    namespace: &str,
    agent: &str,
    settings: &SidecarSettings,
) -> Result<(), ProxyPodError> {
    let Some(spec) = pod.spec.as_ref() else {
        return Err(ProxyPodError::NotMounted);
    };
    if spec.share_process_namespace == Some(true) {
        return Err(ProxyPodError::SharedProcessNamespace);
    }
    let wanted: BTreeSet<&str> = requested.iter().map(String::as_str).collect();
    let values_volumes: BTreeSet<&str> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| {
            v.csi.as_ref().is_some_and(|csi| {
                csi.driver == CSI_DRIVER
                    && csi
                        .volume_attributes
                        .as_ref()
                        .and_then(|a| a.get("grants"))
                        .is_some_and(|g| g.split(',').any(|n| wanted.contains(n.trim())))
            })
        })
        .map(|v| v.name.as_str())
        .collect();
    if values_volumes.is_empty() {
        return Err(ProxyPodError::NoValuesVolume(requested.to_vec()));
    }
    let mounts = |mounts: &Option<Vec<VolumeMount>>| {
        mounts
            .iter()
            .flatten()
            .any(|m| values_volumes.contains(m.name.as_str()))
    };
    let mut sidecar = None;
    for c in spec.init_containers.iter().flatten() {
        if mounts(&c.volume_mounts) {
            if c.name != SIDECAR_NAME || sidecar.is_some() {
                return Err(ProxyPodError::MountedByOther(c.name.clone()));
            }
            sidecar = Some(c);
        }
    }
    for c in &spec.containers {
        if mounts(&c.volume_mounts) {
            return Err(ProxyPodError::MountedByOther(c.name.clone()));
        }
    }
    for c in spec.ephemeral_containers.iter().flatten() {
        // A debug container targeting the sidecar shares its process
        // namespace: /proc/<pid>/root reaches the values.
        if mounts(&c.volume_mounts) || c.target_container_name.as_deref() == Some(SIDECAR_NAME) {
            return Err(ProxyPodError::MountedByOther(c.name.clone()));
        }
    }
    let sidecar = sidecar.ok_or(ProxyPodError::NotMounted)?;
    let rules = compare(sidecar, settings)?;
    if rules.namespace != namespace || rules.agent != agent {
        return Err(ProxyPodError::NotTheSidecar("rules' agent"));
    }
    for name in requested {
        let in_pod = rules.grants.iter().find(|g| &g.grant == name);
        let now = current.iter().find(|g| &g.grant == name);
        if in_pod.is_none() || in_pod != now {
            return Err(ProxyPodError::StaleRules(name.clone()));
        }
    }
    Ok(())
}

const RULES_ENV: &str = "SCOPEHOLD_PROXY_RULES";
const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Compares the fields that decide what the sidecar runs and trusts with
/// what injection renders (the API server's defaults on other fields do
/// not matter); returns the rules the sidecar runs with.
fn compare(actual: &Container, settings: &SidecarSettings) -> Result<ProxyRules, ProxyPodError> {
    let differs = ProxyPodError::NotTheSidecar;
    let rules_json = env_value(actual, RULES_ENV).ok_or(differs("rules"))?;
    let rules = ProxyRules::parse(rules_json).map_err(|_| differs("rules"))?;
    let expected = sidecar_container(rules_json, settings);
    if actual.image != expected.image {
        return Err(differs("image"));
    }
    if actual.command != expected.command || actual.args != expected.args {
        return Err(differs("command"));
    }
    if actual.restart_policy != expected.restart_policy {
        return Err(differs("restartPolicy"));
    }
    if !same_env(&actual.env, &expected.env) {
        return Err(differs("environment"));
    }
    if actual.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(differs("environment"));
    }
    let mount_key = |m: &VolumeMount| {
        (
            m.name.clone(),
            m.mount_path.clone(),
            m.read_only.unwrap_or(false),
            m.sub_path.clone().unwrap_or_default(),
        )
    };
    // The ServiceAccount admission plugin adds the API token to every
    // container; any other extra mount could shadow the sidecar's binary.
    let mut got: Vec<_> = actual
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| {
            !(m.mount_path == SERVICE_ACCOUNT_MOUNT
                && m.read_only == Some(true)
                && m.sub_path.is_none())
        })
        .map(mount_key)
        .collect();
    let mut want: Vec<_> = expected
        .volume_mounts
        .iter()
        .flatten()
        .map(mount_key)
        .collect();
    got.sort();
    want.sort();
    if got != want {
        return Err(differs("volume mounts"));
    }
    if actual.security_context != expected.security_context {
        return Err(differs("security context"));
    }
    Ok(rules)
}

fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name && e.value_from.is_none())
        .and_then(|e| e.value.as_deref())
}

/// The same variables with the same values (order aside); an empty value
/// and an absent one are the same to the API server.
fn same_env(actual: &Option<Vec<EnvVar>>, expected: &Option<Vec<EnvVar>>) -> bool {
    let key = |e: &EnvVar| {
        // The API server defaults a fieldRef's apiVersion to v1.
        let mut from = e.value_from.clone();
        if let Some(field) = from.as_mut().and_then(|f| f.field_ref.as_mut())
            && field.api_version.as_deref() == Some("v1")
        {
            field.api_version = None;
        }
        (
            e.name.clone(),
            e.value.clone().filter(|v| !v.is_empty()),
            serde_json::to_string(&from).unwrap_or_default(),
        )
    };
    let mut a: Vec<_> = actual.iter().flatten().map(key).collect();
    let mut b: Vec<_> = expected.iter().flatten().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{DeliveryMode, GrantedKey, KeyProxy, SecretGrant, SecretGrantSpec};
    use crate::proxy::pod::{VALUES_VOLUME, inject};
    use k8s_openapi::api::core::v1::{CSIVolumeSource, EphemeralContainer, Volume};
    use serde_json::json;

    fn grant(hosts: &[&str]) -> SecretGrant {
        let mut g = SecretGrant::new(
            "openai",
            SecretGrantSpec {
                agent: "coder".into(),
                secret_name: "llm".into(),
                delivery: DeliveryMode::Proxy,
                keys: vec![GrantedKey {
                    key: "api-key".into(),
                    proxy: Some(KeyProxy {
                        hosts: hosts.iter().map(|h| h.to_string()).collect(),
                        replace_placeholder: Some(true),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        g.metadata.namespace = Some("ns".into());
        g
    }

    fn settings() -> SidecarSettings {
        SidecarSettings {
            image: "registry.test/scopehold:1".into(),
            ..Default::default()
        }
    }

    fn injected() -> Pod {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "agent", "namespace": "ns",
                         "annotations": {"scopehold.dev/inject": "proxy"}},
            "spec": {"serviceAccountName": "coder-sa",
                     "containers": [{"name": "agent", "image": "agent:1"}]}
        }))
        .unwrap();
        let rules = ProxyRules {
            namespace: "ns".into(),
            agent: "coder".into(),
            grants: vec![GrantRules::of(&grant(&["api.openai.com"]))],
            egress_allow_list: None,
        };
        inject(&pod, &rules, &settings()).unwrap()
    }

    fn run(pod: &Pod, current: &SecretGrant) -> Result<(), ProxyPodError> {
        check(
            pod,
            &["openai".into()],
            &[GrantRules::of(current)],
            "ns",
            "coder",
            &settings(),
        )
    }

    fn sidecar(pod: &mut Pod) -> &mut Container {
        pod.spec
            .as_mut()
            .unwrap()
            .init_containers
            .as_mut()
            .unwrap()
            .iter_mut()
            .find(|c| c.name == SIDECAR_NAME)
            .unwrap()
    }

    fn mount_in_agent(pod: &mut Pod, volume: &str) {
        pod.spec.as_mut().unwrap().containers[0].volume_mounts = Some(vec![VolumeMount {
            name: volume.into(),
            mount_path: "/mine".into(),
            ..Default::default()
        }]);
    }

    #[test]
    fn the_injected_sidecar_passes() {
        assert_eq!(run(&injected(), &grant(&["api.openai.com"])), Ok(()));
    }

    #[test]
    fn an_agent_container_mounting_the_values_is_refused() {
        let mut pod = injected();
        mount_in_agent(&mut pod, VALUES_VOLUME);
        assert_eq!(
            run(&pod, &grant(&["api.openai.com"])),
            Err(ProxyPodError::MountedByOther("agent".into()))
        );
    }

    #[test]
    fn a_second_volume_naming_the_grant_in_the_agent_is_refused() {
        let mut pod = injected();
        let spec = pod.spec.as_mut().unwrap();
        spec.volumes.as_mut().unwrap().push(Volume {
            name: "mine".into(),
            csi: Some(CSIVolumeSource {
                driver: CSI_DRIVER.into(),
                volume_attributes: Some([("grants".to_string(), "openai".to_string())].into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        mount_in_agent(&mut pod, "mine");
        assert_eq!(
            run(&pod, &grant(&["api.openai.com"])),
            Err(ProxyPodError::MountedByOther("agent".into()))
        );
    }

    #[test]
    fn an_ephemeral_container_mounting_the_values_or_targeting_the_sidecar_is_refused() {
        let mounting = EphemeralContainer {
            name: "debugger".into(),
            volume_mounts: Some(vec![VolumeMount {
                name: VALUES_VOLUME.into(),
                mount_path: "/x".into(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let targeting = EphemeralContainer {
            name: "debugger".into(),
            target_container_name: Some(SIDECAR_NAME.into()),
            ..Default::default()
        };
        for debugger in [mounting, targeting] {
            let mut pod = injected();
            pod.spec.as_mut().unwrap().ephemeral_containers = Some(vec![debugger]);
            assert_eq!(
                run(&pod, &grant(&["api.openai.com"])),
                Err(ProxyPodError::MountedByOther("debugger".into()))
            );
        }
    }

    #[test]
    fn a_look_alike_sidecar_is_refused() {
        for (what, change) in [
            (
                "image",
                Box::new(|c: &mut Container| c.image = Some("busybox".into()))
                    as Box<dyn Fn(&mut Container)>,
            ),
            (
                "command",
                Box::new(|c: &mut Container| c.command = Some(vec!["/bin/sh".into()])),
            ),
            (
                "environment",
                Box::new(|c: &mut Container| {
                    c.env.as_mut().unwrap().push(EnvVar {
                        name: "SCOPEHOLD_PROXY_UPSTREAM_CA".into(),
                        value: Some("/mine/ca.crt".into()),
                        ..Default::default()
                    })
                }),
            ),
            (
                "environment",
                Box::new(|c: &mut Container| {
                    for e in c.env.as_mut().unwrap() {
                        if e.name == "SCOPEHOLD_PROXY_LISTEN" {
                            e.value = Some("0.0.0.0:15001".into());
                        }
                    }
                }),
            ),
            (
                "security context",
                Box::new(|c: &mut Container| c.security_context = None),
            ),
        ] {
            let mut pod = injected();
            change(sidecar(&mut pod));
            assert_eq!(
                run(&pod, &grant(&["api.openai.com"])),
                Err(ProxyPodError::NotTheSidecar(what)),
                "{what}"
            );
        }
    }

    #[test]
    fn only_the_api_token_may_be_mounted_besides() {
        let mut pod = injected();
        sidecar(&mut pod)
            .volume_mounts
            .as_mut()
            .unwrap()
            .push(VolumeMount {
                name: "kube-api-access-x".into(),
                mount_path: SERVICE_ACCOUNT_MOUNT.into(),
                read_only: Some(true),
                ..Default::default()
            });
        assert_eq!(run(&pod, &grant(&["api.openai.com"])), Ok(()));
        sidecar(&mut pod)
            .volume_mounts
            .as_mut()
            .unwrap()
            .push(VolumeMount {
                name: "evil".into(),
                mount_path: "/scopehold".into(),
                sub_path: Some("binary".into()),
                ..Default::default()
            });
        assert_eq!(
            run(&pod, &grant(&["api.openai.com"])),
            Err(ProxyPodError::NotTheSidecar("volume mounts"))
        );
    }

    #[test]
    fn rules_sending_the_value_elsewhere_are_refused() {
        // A pod author's own rules: the same grant, another host.
        let mut pod = injected();
        let evil = ProxyRules {
            namespace: "ns".into(),
            agent: "coder".into(),
            grants: vec![GrantRules::of(&grant(&["evil.example"]))],
            egress_allow_list: None,
        };
        for e in sidecar(&mut pod).env.as_mut().unwrap() {
            if e.name == RULES_ENV {
                e.value = Some(serde_json::to_string(&evil).unwrap());
            }
        }
        assert_eq!(
            run(&pod, &grant(&["api.openai.com"])),
            Err(ProxyPodError::StaleRules("openai".into()))
        );
        // And a grant narrowed after the pod started no longer goes to it.
        assert_eq!(
            run(&injected(), &grant(&["other.openai.com"])),
            Err(ProxyPodError::StaleRules("openai".into()))
        );
    }

    #[test]
    fn a_shared_process_namespace_is_refused() {
        let mut pod = injected();
        pod.spec.as_mut().unwrap().share_process_namespace = Some(true);
        assert_eq!(
            run(&pod, &grant(&["api.openai.com"])),
            Err(ProxyPodError::SharedProcessNamespace)
        );
    }

    #[test]
    fn a_pod_without_the_named_volume_is_refused() {
        let mut pod = injected();
        pod.spec.as_mut().unwrap().volumes = None;
        assert!(matches!(
            run(&pod, &grant(&["api.openai.com"])),
            Err(ProxyPodError::NoValuesVolume(_))
        ));
    }
}
