//! HTTP on localhost: `/healthz`, `/status` (JSON) and `/metrics` (Prometheus text).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// What the HTTP handlers read; the node updates `status` and `unhealthy` periodically.
pub struct Shared {
    /// The metrics registry.
    pub registry: prometheus_client::registry::Registry,
    /// The latest `/status` document.
    pub status: Mutex<serde_json::Value>,
    /// Health: `None` = healthy, `Some(reason)` otherwise.
    pub unhealthy: Mutex<Option<String>>,
    /// Refreshes mirrored gauges before a scrape.
    pub before_scrape: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// Binds `addr` and serves until the process ends. Returns the bound address.
pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) -> anyhow::Result<SocketAddr> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("http.listen {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "http server stopped");
        }
    });
    Ok(bound)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn healthz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    match lock(&s.unhealthy).clone() {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {reason}\n"),
        ),
    }
}

async fn status(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    axum::Json(lock(&s.status).clone())
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    (s.before_scrape)();
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            e.to_string(),
        ),
    }
}
