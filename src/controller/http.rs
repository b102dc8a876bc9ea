//! `/metrics`, `/healthz` and `/readyz` on one small HTTP listener.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

use super::WatchHealth;

#[derive(Clone)]
struct HttpState {
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
    health: Arc<WatchHealth>,
}

/// `/readyz` answers 503 until the caches hold a full list, and again while
/// any watch is failing (custody would answer from stale state).
pub fn router(registry: Arc<Registry>, ready: Arc<AtomicBool>, health: Arc<WatchHealth>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(HttpState {
            registry,
            ready,
            health,
        })
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "encoding metrics failed".to_owned(),
        ),
    }
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if !state.ready.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "caches not synced".to_owned(),
        );
    }
    match state.health.check() {
        Ok(()) => (StatusCode::OK, "ready".to_owned()),
        Err(down) => (StatusCode::SERVICE_UNAVAILABLE, down),
    }
}
