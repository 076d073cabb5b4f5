//! The admin port: `/healthz`, `/readyz` and `/metrics`, on a listener of its own so that probes
//! and scrapes never share a port (or a connection limit) with KMS traffic.
//!
//! Bounded for everyone: at most [`MAX_CONNECTIONS`] connections (at the cap, the oldest is
//! closed to make room, so that a probe always gets in); a request head of at most
//! [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`] lines (else 431), within [`HEADER_READ_TIMEOUT`]; and
//! every connection closed [`CONNECTION_LIFETIME`] after accept (an answer under way gets
//! [`CLOSE_GRACE`] to finish), whatever it is doing.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::debug;

use crate::metrics::{self, Metrics};

/// What the admin endpoints report on.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Set at the first shutdown signal: `/readyz` fails from then on.
    pub draining: AtomicBool,
}

/// Connections the admin port holds at once; probes and scrapes need a handful.
pub const MAX_CONNECTIONS: usize = 32;
/// The read buffer, and so the largest request head (hyper's smallest buffer).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// The most header lines a request may carry.
pub const MAX_HEADERS: usize = 32;
/// A request head must be read within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Every admin connection is closed this long after accept (a scraper reconnects): the answer
/// being written then gets [`CLOSE_GRACE`] more.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);
/// How long an answer under way at the end of a connection's lifetime may still take.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The admin connections open, oldest first.
#[derive(Default)]
struct Open {
    next: u64,
    tasks: BTreeMap<u64, tokio::task::AbortHandle>,
}

/// Serves the admin endpoints until the task is aborted.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    let open = Arc::new(Mutex::new(Open::default()));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = Arc::clone(&state);
        let connection = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(answer(&state, &request)) }
            }),
        );
        // Held until the new task is in the map, so that it cannot remove itself first.
        let mut slots = lock(&open);
        // At the cap, the oldest connection makes room: a probe always gets in.
        while slots.tasks.len() >= MAX_CONNECTIONS {
            if let Some((_, oldest)) = slots.tasks.pop_first() {
                debug!("admin port at {MAX_CONNECTIONS} connections: closing the oldest");
                oldest.abort();
            }
        }
        let id = slots.next;
        slots.next += 1;
        let done = Arc::clone(&open);
        let task = tokio::spawn(async move {
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => Some(ended),
                () = tokio::time::sleep(CONNECTION_LIFETIME) => None,
            };
            let ended = match ended {
                Some(ended) => Some(ended),
                None => {
                    // Its time is up: the request being answered is finished, then it closes.
                    connection.as_mut().graceful_shutdown();
                    tokio::time::timeout(CLOSE_GRACE, connection).await.ok()
                }
            };
            match ended {
                Some(Err(error)) => debug!(%peer, %error, "admin connection ended with an error"),
                Some(Ok(())) => {}
                None => debug!(%peer, "admin connection closed: open {CONNECTION_LIFETIME:?}"),
            }
            lock(&done).tasks.remove(&id);
        });
        slots.tasks.insert(id, task.abort_handle());
    }
}

/// The open connections; a poisoned map is still consistent (nothing panics holding it).
fn lock(open: &Mutex<Open>) -> std::sync::MutexGuard<'_, Open> {
    open.lock().unwrap_or_else(|e| e.into_inner())
}

fn answer(state: &AdminState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.draining.load(Ordering::SeqCst) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        "/readyz" => text(StatusCode::OK, "ready\n"),
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(state.metrics.encode())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; the admin port serves /healthz, /readyz and /metrics\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
