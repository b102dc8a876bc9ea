//! Errors of the kubectl plugin. Every message names objects and keys only,
//! never a Secret value.

use std::error::Error as _;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{kind} {name:?} not found in namespace {namespace:?}")]
    NotFound {
        kind: &'static str,
        name: String,
        namespace: String,
    },
    #[error(
        "Secret {secret:?} in namespace {namespace:?} has no key {key:?} (its keys: {})",
        list_or_none(available)
    )]
    KeyNotFound {
        secret: String,
        namespace: String,
        key: String,
        available: Vec<String>,
    },
    #[error("{kind} {name:?} already exists in namespace {namespace:?}{hint}")]
    AlreadyExists {
        kind: &'static str,
        name: String,
        namespace: String,
        hint: &'static str,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("demo: {0}")]
    Demo(#[source] crate::demo::DemoError),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("{action}: {message}")]
    Api { action: String, message: String },
    #[error("{0}")]
    ConfirmationRequired(String),
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("encoding YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

impl CliError {
    pub fn not_found(kind: &'static str, name: &str, namespace: &str) -> Self {
        CliError::NotFound {
            kind,
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        CliError::InvalidArgument(message.into())
    }
}

/// Maps a kube error to a message that says what was being done. For API
/// errors the server's own message is kept (it is the most precise: RBAC,
/// schema validation, CEL rules).
pub fn api(action: impl Into<String>) -> impl FnOnce(kube::Error) -> CliError {
    let action = action.into();
    move |error| CliError::Api {
        action,
        message: describe(&error),
    }
}

/// The HTTP status code of an API error, if it is one.
pub fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

fn describe(error: &kube::Error) -> String {
    if let kube::Error::Api(status) = error
        && !status.message.is_empty()
    {
        return status.message.clone();
    }
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_like_kubectl() {
        assert_eq!(
            CliError::not_found("AgentIdentity", "x", "y").to_string(),
            r#"AgentIdentity "x" not found in namespace "y""#
        );
        let missing = CliError::KeyNotFound {
            secret: "s".into(),
            namespace: "ns".into(),
            key: "k".into(),
            available: vec!["a".into(), "b".into()],
        };
        assert_eq!(
            missing.to_string(),
            r#"Secret "s" in namespace "ns" has no key "k" (its keys: a, b)"#
        );
    }

    #[test]
    fn api_errors_keep_the_server_message() {
        let status =
            kube::core::Status::failure("grants are forbidden", "Forbidden").with_code(403);
        let error = api("creating SecretGrant \"g\"")(kube::Error::Api(Box::new(status)));
        assert_eq!(
            error.to_string(),
            r#"creating SecretGrant "g": grants are forbidden"#
        );
    }
}
