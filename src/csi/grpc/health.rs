//! The node plugin's own health endpoint (replaces the livenessprobe sidecar).
//!
//! - `/healthz` (liveness): the plugin's runtime answers. Custody being away
//!   is not a reason to restart: mounted content and local expiry keep
//!   working without it, and a restart would not bring it back.
//! - `/readyz` (readiness): kubelet registered the driver (when registration
//!   is on) and custody is reachable — the same answer as CSI Probe. The body
//!   says which part is missing.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use super::registration::{RegistrationState, RegistrationStatus};

/// Answers "is custody reachable right now?".
pub type CustodyCheck = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// What readiness looks at.
#[derive(Clone)]
pub struct HealthState {
    /// `None` when the plugin does not register itself with kubelet.
    pub registration: Option<RegistrationState>,
    pub custody: CustodyCheck,
}

/// `/healthz` and `/readyz`.
pub fn router(state: HealthState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn readyz(State(state): State<HealthState>) -> (StatusCode, String) {
    let registration = match state.registration.as_ref().map(RegistrationState::status) {
        None | Some(RegistrationStatus::Registered) => None,
        Some(RegistrationStatus::Pending) => {
            Some("kubelet has not registered the driver yet".to_owned())
        }
        Some(RegistrationStatus::Failed(error)) => Some(format!(
            "kubelet refused the driver's registration: {error}"
        )),
    };
    let custody = (state.custody)().await;
    match (registration, custody) {
        (None, true) => (StatusCode::OK, "ok\n".to_owned()),
        (Some(problem), true) => (StatusCode::SERVICE_UNAVAILABLE, format!("{problem}\n")),
        (None, false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "custody is unreachable\n".to_owned(),
        ),
        (Some(problem), false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{problem}; custody is unreachable\n"),
        ),
    }
}

/// Binds `addr` and serves [`router`] in the background.
pub async fn spawn(addr: SocketAddr, state: HealthState) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router(state)).await {
            tracing::error!(%error, "health endpoint stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    async fn get_status(
        addr: SocketAddr,
        path: &str,
    ) -> Result<(u16, String), Box<dyn std::error::Error>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let code = response
            .split_whitespace()
            .nth(1)
            .ok_or("no status line")?
            .parse()?;
        let body = response
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        Ok((code, body))
    }

    fn custody(reachable: Arc<std::sync::atomic::AtomicBool>) -> CustodyCheck {
        Arc::new(move || {
            let reachable = reachable.clone();
            Box::pin(async move { reachable.load(std::sync::atomic::Ordering::SeqCst) })
        })
    }

    #[tokio::test]
    async fn readiness_follows_registration_and_custody_liveness_does_not() -> TestResult {
        let reachable = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let registration = RegistrationState::default();
        let addr = spawn(
            "127.0.0.1:0".parse()?,
            HealthState {
                registration: Some(registration.clone()),
                custody: custody(reachable.clone()),
            },
        )
        .await?;

        let (code, body) = get_status(addr, "/readyz").await?;
        assert_eq!(code, 503);
        assert!(body.contains("has not registered"), "{body}");

        registration.set_for_test(RegistrationStatus::Failed("bad version".into()));
        let (code, body) = get_status(addr, "/readyz").await?;
        assert_eq!(code, 503);
        assert!(
            body.contains("refused") && body.contains("bad version"),
            "{body}"
        );

        registration.set_for_test(RegistrationStatus::Registered);
        assert_eq!(get_status(addr, "/readyz").await?.0, 200);

        reachable.store(false, std::sync::atomic::Ordering::SeqCst);
        let (code, body) = get_status(addr, "/readyz").await?;
        assert_eq!(code, 503);
        assert!(body.contains("custody is unreachable"), "{body}");
        // Liveness does not depend on custody.
        assert_eq!(get_status(addr, "/healthz").await?.0, 200);
        Ok(())
    }
}
