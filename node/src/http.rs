//! HTTP on localhost: `/healthz`, `/status` (JSON), `/metrics` (Prometheus text), and the
//! audit log: `/audit` (entries as JSON lines) and `/audit/verify` (the chain check, as JSON).
//! Also [`fetch`], the bounded client the CLI asks a running node with.
//!
//! `GET /audit?after=SEQ&limit=N` sends at most N (1..=1000, default 100) entries with seq > SEQ
//! (default 0), oldest first; `GET /audit?tail=N` the last N (1..=1000). Each line is
//! [`AuditEntry::to_json`](crate::audit::AuditEntry::to_json), as `fedmesh audit tail` prints it.
//! A bad query gets 400 with `{"error": ..., "parameter": NAME}`.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::Semaphore;

use crate::audit::{AuditView, MAX_PAGE};

/// `GET /audit` without `limit`.
const DEFAULT_LIMIT: usize = 100;
/// Audit reads served at once; more get 429.
const MAX_AUDIT_READS: usize = 4;

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
/// The audit endpoints read the node's log through `audit` (503 once the log is gone).
pub async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    audit: Weak<AuditView>,
) -> anyhow::Result<SocketAddr> {
    let audit = Router::new()
        .route("/audit", get(audit_entries))
        .route("/audit/verify", get(audit_verify))
        .with_state(AuditState {
            view: audit,
            reads: Arc::new(Semaphore::new(MAX_AUDIT_READS)),
            verifying: Arc::new(Semaphore::new(1)),
        });
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(shared)
        .merge(audit);
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

#[derive(Debug, Clone)]
struct AuditState {
    view: Weak<AuditView>,
    /// Bounds the blocking reads of `/audit`.
    reads: Arc<Semaphore>,
    /// One `/audit/verify` at a time: it reads the whole log.
    verifying: Arc<Semaphore>,
}

/// What `GET /audit` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuditQuery {
    /// At most `limit` entries with seq > `after`.
    After { after: u64, limit: usize },
    /// The last `n` entries.
    Tail(usize),
}

/// A query parameter `GET /audit` refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BadParam {
    parameter: String,
    reason: String,
}

impl AuditQuery {
    fn parse(query: Option<&str>) -> Result<Self, BadParam> {
        let bad = |parameter: &str, reason: String| BadParam {
            parameter: clip(parameter, 64).to_string(),
            reason,
        };
        let (mut after, mut limit, mut tail) = (None, None, None);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match name {
                "after" => &mut after,
                "limit" => &mut limit,
                "tail" => &mut tail,
                _ => {
                    let reason = "unknown parameter (expected after, limit or tail)".to_string();
                    return Err(bad(name, reason));
                }
            };
            if slot.is_some() {
                return Err(bad(name, "given more than once".into()));
            }
            *slot = Some(value);
        }
        let number = |name: &str, value: &str, min: u64, max: u64| {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| (min..=max).contains(n) && value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| {
                    let range = if max == u64::MAX {
                        "a whole number".to_string()
                    } else {
                        format!("a whole number from {min} to {max}")
                    };
                    bad(name, format!("must be {range}, got {:?}", clip(value, 32)))
                })
        };
        let page = MAX_PAGE as u64;
        match (after, limit, tail) {
            (None, None, Some(n)) => Ok(Self::Tail(number("tail", n, 1, page)? as usize)),
            (_, _, Some(_)) => Err(bad("tail", "cannot be combined with after or limit".into())),
            (after, limit, None) => Ok(Self::After {
                after: after.map_or(Ok(0), |v| number("after", v, 0, u64::MAX))?,
                limit: limit.map_or(Ok(DEFAULT_LIMIT as u64), |v| number("limit", v, 1, page))?
                    as usize,
            }),
        }
    }
}

/// At most `max` bytes of `s` (cut at a character boundary), for echoing input in errors.
pub(crate) fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn json_error(status: StatusCode, error: String, parameter: Option<&str>) -> Response {
    let mut body = serde_json::json!({ "error": error });
    if let Some(p) = parameter {
        body["parameter"] = p.into();
    }
    (status, axum::Json(body)).into_response()
}

fn no_audit_log() -> Response {
    json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "this node has no audit log open".into(),
        None,
    )
}

async fn audit_entries(State(a): State<AuditState>, RawQuery(query): RawQuery) -> Response {
    let query = match AuditQuery::parse(query.as_deref()) {
        Ok(q) => q,
        Err(BadParam { parameter, reason }) => {
            let error = format!("bad parameter `{parameter}`: {reason}");
            return json_error(StatusCode::BAD_REQUEST, error, Some(&parameter));
        }
    };
    let Some(view) = a.view.upgrade() else {
        return no_audit_log();
    };
    let Ok(permit) = a.reads.try_acquire_owned() else {
        let error = format!("more than {MAX_AUDIT_READS} audit reads at once; retry");
        return json_error(StatusCode::TOO_MANY_REQUESTS, error, None);
    };
    let read = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let entries = match query {
            AuditQuery::After { after, limit } => view.after(after, limit)?,
            AuditQuery::Tail(n) => view.tail(n)?,
        };
        let mut body = String::new();
        for entry in entries {
            body.push_str(&entry.to_json().to_string());
            body.push('\n');
        }
        Ok::<_, crate::audit::AuditError>(body)
    })
    .await;
    match read {
        Ok(Ok(body)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            body,
        )
            .into_response(),
        Ok(Err(e)) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    }
}

async fn audit_verify(State(a): State<AuditState>) -> Response {
    let Some(view) = a.view.upgrade() else {
        return no_audit_log();
    };
    let Ok(permit) = a.verifying.try_acquire_owned() else {
        let error = "a verification is already running; retry when it is done".to_string();
        return json_error(StatusCode::TOO_MANY_REQUESTS, error, None);
    };
    let report = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        view.verify()
    })
    .await;
    match report {
        Ok(Ok(report)) => axum::Json(report.to_json()).into_response(),
        Ok(Err(e)) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    }
}

/// A bounded HTTP/1.0 `GET path` to the node's HTTP server at `addr` (the CLI's client): the
/// status code and body. The exchange must end within `timeout`, the answer fit in `max_bytes`.
/// An error of kind `InvalidData` means something answered, but not HTTP this reads; any other
/// means nothing answered.
pub async fn fetch(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    max_bytes: usize,
) -> io::Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        (&mut stream)
            .take(max_bytes as u64 + 1)
            .read_to_end(&mut answer)
            .await?;
        Ok::<_, io::Error>(answer)
    };
    let answer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| {
            io::Error::new(io::ErrorKind::TimedOut, format!("no answer in {timeout:?}"))
        })??;
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    if answer.len() > max_bytes {
        return Err(invalid(&format!("answer larger than {max_bytes} bytes")));
    }
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("not an HTTP answer (no end of headers)"))?;
    let head = std::str::from_utf8(&answer[..split]).map_err(|_| invalid("headers not UTF-8"))?;
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| invalid("not an HTTP answer (bad status line)"))?;
    let chunked = head.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    if chunked {
        return Err(invalid("chunked answer to an HTTP/1.0 request"));
    }
    Ok((status, answer[split + 4..].to_vec()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::audit::AuditLog;
    use fedmesh_protocol::NodeKey;

    fn parse(q: &str) -> Result<AuditQuery, BadParam> {
        AuditQuery::parse(Some(q))
    }

    fn bad(q: &str) -> String {
        parse(q).unwrap_err().parameter
    }

    #[test]
    fn audit_query_defaults_bounds_and_named_errors() {
        let after = |after, limit| Ok(AuditQuery::After { after, limit });
        assert_eq!(AuditQuery::parse(None), after(0, DEFAULT_LIMIT));
        assert_eq!(parse(""), after(0, DEFAULT_LIMIT));
        assert_eq!(parse("after=7&limit=1000"), after(7, 1000));
        assert_eq!(parse("tail=3"), Ok(AuditQuery::Tail(3)));
        for (query, parameter) in [
            ("limit=1001", "limit"),
            ("limit=0", "limit"),
            ("limit=", "limit"),
            ("limit=+5", "limit"),
            ("after=-1", "after"),
            ("after=18446744073709551616", "after"),
            ("after=1&after=2", "after"),
            ("tail=0", "tail"),
            ("tail=5&after=1", "tail"),
            ("limit=5&tail=5", "tail"),
            ("seq=1", "seq"),
        ] {
            assert_eq!(bad(query), parameter, "{query}");
        }
        let e = parse("limit=5000").unwrap_err();
        assert_eq!(
            e.reason,
            r#"must be a whole number from 1 to 1000, got "5000""#
        );
        assert_eq!(bad(&"x".repeat(500)).len(), 64, "echoed names are bounded");
    }

    #[tokio::test]
    async fn audit_endpoints_serve_the_live_log() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let mut log = AuditLog::open(&db, NodeKey::from_secret_bytes([3; 32])).unwrap();
        for i in 1..=3 {
            log.append("task", &format!("t{i}"), serde_json::json!({"i": i}), i)
                .unwrap();
        }
        let shared = Arc::new(Shared {
            registry: prometheus_client::registry::Registry::default(),
            status: Mutex::new(serde_json::json!({})),
            unhealthy: Mutex::new(None),
            before_scrape: Box::new(|| {}),
        });
        let view = log.view();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            shared,
            Arc::downgrade(&view),
        )
        .await
        .unwrap();
        let get = |path: &'static str| async move {
            let (status, body) = fetch(addr, path, Duration::from_secs(5), 1 << 20)
                .await
                .unwrap();
            (status, String::from_utf8(body).unwrap())
        };
        let seqs = |body: &str| -> Vec<u64> {
            body.lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                        .as_u64()
                        .unwrap()
                })
                .collect()
        };
        let (status, body) = get("/audit").await;
        assert_eq!((status, seqs(&body)), (200, vec![1, 2, 3]));
        let first = log.view().after(0, 1).unwrap()[0].to_json().to_string();
        assert_eq!(body.lines().next(), Some(first.as_str()), "the CLI's lines");
        assert_eq!(seqs(&get("/audit?after=1&limit=1").await.1), [2]);
        assert_eq!(seqs(&get("/audit?tail=2").await.1), [2, 3]);
        assert!(get("/audit?after=3").await.1.is_empty());
        let (status, body) = get("/audit?limit=1001").await;
        assert_eq!(status, 400);
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["parameter"], "limit");
        assert!(
            error["error"].as_str().unwrap().contains("`limit`"),
            "{body}"
        );
        let (status, body) = get("/audit/verify").await;
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (status, &report["ok"], &report["entries"]),
            (200, &true.into(), &3.into())
        );
        // Once the node's log is gone there is nothing to serve.
        drop((view, log));
        assert_eq!(get("/audit").await.0, 503);
        assert_eq!(get("/audit/verify").await.0, 503);
    }

    #[tokio::test]
    async fn fetch_is_bounded() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut request = [0; 1024];
                let _ = s.read(&mut request).await; // unread bytes would reset the connection
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n0123456789").await;
            }
        });
        let got = fetch(addr, "/", Duration::from_secs(5), 100).await.unwrap();
        assert_eq!(got, (200, b"0123456789".to_vec()));
        let err = fetch(addr, "/", Duration::from_secs(5), 20)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
