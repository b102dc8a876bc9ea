//! Logging setup shared by every binary.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How log lines are written on stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// One JSON object per line, event fields at the top level.
    #[default]
    Json,
    /// Human-readable text.
    Text,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default filter.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,kube=warn,tower=warn,hyper=warn,h2=warn,rustls=warn")
    });
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_target(true),
            )
            .try_init(),
        LogFormat::Text => registry.with(fmt::layer().with_target(true)).try_init(),
    };
    if let Err(e) = result {
        eprintln!("logging already initialised: {e}");
    }
}

/// `/metrics` (Prometheus text) and `/healthz` of one registry, for a small
/// HTTP listener.
pub fn metrics_router(
    registry: std::sync::Arc<prometheus_client::registry::Registry>,
) -> axum::Router {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
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
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
}
