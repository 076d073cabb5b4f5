//! The connections to KMS one client connection holds on the general server, as the fast path
//! holds its own: no client shares an upstream connection, its stream slots or its flow-control
//! window with another, so one that withholds bodies, advertises a zero window or cancels streams
//! slows or breaks only its own exchanges.
//!
//! A lane holds at most `[limits].max_concurrent_streams` connections to KMS at once (HTTP/2 for
//! requests signed over `:authority`, one per destination, multiplexed; HTTP/1.1 for the rest,
//! one request at a time each, kept for the next request while the client connection lives).
//! The first is covered by the client connection's place in the connection budget (two
//! descriptors a place); each further one takes a place of its own, held busy while it is open,
//! so every descriptor stays inside `max_connections`. At the limit with no room, the request is
//! answered 502 and nothing is sent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::body::ProxyBody;
use super::budget::{InFlight, Registration};
use super::state::Shared;
use super::upstream::{exchange_failed, H1Sender, H2Sender};
use crate::answer::ProxyError;
use crate::metrics::UpstreamErrorKind;

/// The connections to KMS of one client connection.
pub(crate) struct Lane {
    shared: Arc<Shared>,
    /// One permit per open connection to KMS: `max_concurrent_streams` of them.
    open: Arc<Semaphore>,
    cap: usize,
    /// Whether the connection the client connection's own place covers is taken.
    covered: Arc<AtomicBool>,
    /// HTTP/2 connections by destination (scheme and authority).
    h2: tokio::sync::Mutex<Vec<(Uri, H2Sender)>>,
    /// HTTP/1.1 connections with no request on them, by destination.
    idle: Mutex<Vec<(Uri, H1Sender)>>,
    /// Set when the client connection has ended: nothing more is kept.
    closed: AtomicBool,
}

/// What an open connection to KMS holds until it closes: its permit of the lane, and its place
/// in the connection budget (the client connection's own, or one of its own).
struct Hold {
    _permit: OwnedSemaphorePermit,
    place: Place,
}

enum Place {
    Covered(Arc<AtomicBool>),
    /// A place of its own, busy (never closed for room) while the connection is open.
    Own(
        #[allow(dead_code)] InFlight,
        #[allow(dead_code)] Registration,
    ),
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Place::Covered(covered) = &self.place {
            covered.store(false, Ordering::SeqCst);
        }
    }
}

/// Hands an HTTP/1.1 connection back to its lane once the answer on it has been read to its
/// end; dropped unused (an answer cut off), the connection closes instead.
pub(crate) struct Reuse {
    lane: Weak<Lane>,
    target: Uri,
    sender: H1Sender,
}

impl Reuse {
    pub(crate) fn give_back(self) {
        if let Some(lane) = self.lane.upgrade() {
            lane.keep(self.target, self.sender);
        }
    }
}

/// KMS's answer head, its body to come, and the connection to hand back after it.
pub(crate) type Answer = (Response<Incoming>, Option<Reuse>);

impl Lane {
    pub(crate) fn new(shared: Arc<Shared>) -> Lane {
        let cap = usize::try_from(shared.limits.max_concurrent_streams)
            .unwrap_or(usize::MAX)
            .clamp(1, Semaphore::MAX_PERMITS);
        Lane {
            shared,
            open: Arc::new(Semaphore::new(cap)),
            cap,
            covered: Arc::new(AtomicBool::new(false)),
            h2: tokio::sync::Mutex::new(Vec::new()),
            idle: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        }
    }

    /// The client connection has ended: the connections kept for later requests close, and
    /// this waits until those still carrying a request (a tag change forwarded in a task of its
    /// own, which a client that hangs up cannot cancel) have closed too, at most as long as such
    /// an exchange may last (`connect_timeout_ms` + 2 × `timeout_ms`, head and body).
    pub(crate) async fn close_and_drain(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.idle_list().clear();
        self.h2.lock().await.clear();
        let config = self.shared.upstream.config();
        let longest = config.connect_timeout + 2 * config.timeout;
        let all = u32::try_from(self.cap).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(longest, self.open.acquire_many(all)).await;
    }

    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        &self.shared.metrics
    }

    fn idle_list(&self) -> std::sync::MutexGuard<'_, Vec<(Uri, H1Sender)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn keep(&self, target: Uri, sender: H1Sender) {
        if self.closed.load(Ordering::SeqCst) || sender.is_closed() {
            return;
        }
        self.idle_list().push((target, sender));
    }

    /// A permit and a place for one more connection to KMS; waits (within the caller's
    /// deadline) while the lane's connections are all open.
    async fn hold(&self) -> Result<Hold, ProxyError> {
        let permit = match Arc::clone(&self.open).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Kept connections to other destinations make way.
                self.idle_list().clear();
                Arc::clone(&self.open)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        let place = if !self.covered.swap(true, Ordering::SeqCst) {
            Place::Covered(Arc::clone(&self.covered))
        } else {
            let Some(registration) = self.shared.budget.admit(-1) else {
                self.shared
                    .metrics
                    .upstream_error(UpstreamErrorKind::connect);
                return Err(ProxyError::UpstreamConnect(
                    "no room for another connection to KMS: the proxy is at [limits].max_connections and every connection is busy".into(),
                ));
            };
            let busy = registration.conn().begin_request();
            Place::Own(busy, registration)
        };
        Ok(Hold {
            _permit: permit,
            place,
        })
    }

    /// Sends a request signed over `host` as HTTP/1.1 to `target` (its URI is the path): on a
    /// kept connection, or a new one within `connect_timeout_ms`; then waits at most
    /// `timeout_ms` for the answer's head.
    pub(crate) async fn send_h1(
        self: &Arc<Self>,
        mut request: Request<ProxyBody>,
        target: &Uri,
    ) -> Result<Answer, ProxyError> {
        let upstream = &self.shared.upstream;
        let metrics = upstream.metrics();
        // A kept connection that closed before the request went out is replaced once; a
        // request that went out is never sent again.
        let mut kept = self.take_kept(target);
        loop {
            let (mut sender, fresh) = match kept.take() {
                Some(sender) => (sender, false),
                None => (self.connect_h1(target).await?, true),
            };
            if !fresh {
                let ready = tokio::time::timeout(upstream.config().connect_timeout, sender.ready());
                if !matches!(ready.await, Ok(Ok(()))) {
                    continue;
                }
            }
            let sent = tokio::time::timeout(upstream.timeout(), sender.try_send_request(request));
            match sent.await {
                Err(_) => {
                    metrics.upstream_error(UpstreamErrorKind::timeout);
                    return Err(ProxyError::UpstreamTimeout(upstream.timeout().as_millis()));
                }
                Ok(Ok(response)) => {
                    let reuse = Reuse {
                        lane: Arc::downgrade(self),
                        target: target.clone(),
                        sender,
                    };
                    return Ok((response, Some(reuse)));
                }
                Ok(Err(mut error)) => match error.take_message() {
                    Some(unsent) if !fresh => request = unsent,
                    unsent => {
                        return Err(exchange_failed(metrics, error.error(), unsent.is_some()))
                    }
                },
            }
        }
    }

    /// A kept connection to `target`, if one is still open.
    fn take_kept(&self, target: &Uri) -> Option<H1Sender> {
        let mut idle = self.idle_list();
        idle.retain(|(_, sender)| !sender.is_closed());
        let at = idle
            .iter()
            .rposition(|(kept, _)| same_origin(kept, target))?;
        Some(idle.swap_remove(at).1)
    }

    /// A new HTTP/1.1 connection to `target`, within `connect_timeout_ms` (waiting for a place
    /// included).
    async fn connect_h1(&self, target: &Uri) -> Result<H1Sender, ProxyError> {
        let upstream = &self.shared.upstream;
        let connecting = async {
            let hold = self.hold().await?;
            let (sender, connection) = upstream.dial_h1(target).await?;
            tokio::spawn(async move {
                connection.await;
                drop(hold);
            });
            Ok(sender)
        };
        match tokio::time::timeout(upstream.config().connect_timeout, connecting).await {
            Ok(result) => result,
            Err(_) => Err(self.waited_too_long()),
        }
    }

    fn waited_too_long(&self) -> ProxyError {
        self.shared
            .metrics
            .upstream_error(UpstreamErrorKind::timeout);
        ProxyError::UpstreamConnect(format!(
            "no connection to KMS within {} ms ([upstream].connect_timeout_ms): this client connection's {} connections to KMS ([limits].max_concurrent_streams) were all busy, or connecting took too long",
            self.shared.upstream.config().connect_timeout.as_millis(),
            self.shared.limits.max_concurrent_streams
        ))
    }

    /// Sends a request signed over `:authority` to KMS as HTTP/2, `:authority` exactly as the
    /// client sent it (`request`'s URI carries it), over this lane's connection to `dial`,
    /// opened within `connect_timeout_ms` if it has none; then waits at most `timeout_ms` for
    /// the answer's head.
    pub(crate) async fn send_h2(
        &self,
        mut request: Request<ProxyBody>,
        dial: &Uri,
    ) -> Result<Response<Incoming>, ProxyError> {
        let upstream = &self.shared.upstream;
        let metrics = upstream.metrics();
        loop {
            let (mut sender, fresh) = self.h2_sender(dial).await?;
            let sent = tokio::time::timeout(upstream.timeout(), sender.try_send_request(request));
            match sent.await {
                Err(_) => {
                    metrics.upstream_error(UpstreamErrorKind::timeout);
                    return Err(ProxyError::UpstreamTimeout(upstream.timeout().as_millis()));
                }
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(mut error)) => match error.take_message() {
                    // The kept connection closed before the request went out: once more, on a
                    // new one.
                    Some(unsent) if !fresh => {
                        self.forget_closed_h2().await;
                        request = unsent;
                    }
                    unsent => {
                        self.forget_closed_h2().await;
                        return Err(exchange_failed(metrics, error.error(), unsent.is_some()));
                    }
                },
            }
        }
    }

    /// This lane's HTTP/2 connection to `dial`, and whether it was just opened.
    async fn h2_sender(&self, dial: &Uri) -> Result<(H2Sender, bool), ProxyError> {
        // Held while connecting: the client's other streams wait for the same connection
        // rather than open their own.
        let mut open = self.h2.lock().await;
        open.retain(|(_, sender)| !sender.is_closed());
        if let Some((_, sender)) = open.iter().find(|(kept, _)| same_origin(kept, dial)) {
            return Ok((sender.clone(), false));
        }
        let upstream = &self.shared.upstream;
        let connecting = async {
            let hold = self.hold().await?;
            let (sender, connection) = upstream.dial_h2(dial).await?;
            tokio::spawn(async move {
                connection.await;
                drop(hold);
            });
            Ok::<_, ProxyError>(sender)
        };
        let sender = match tokio::time::timeout(upstream.config().connect_timeout, connecting).await
        {
            Ok(result) => result?,
            Err(_) => return Err(self.waited_too_long()),
        };
        if !self.closed.load(Ordering::SeqCst) {
            open.push((dial.clone(), sender.clone()));
        }
        Ok((sender, true))
    }

    async fn forget_closed_h2(&self) {
        self.h2
            .lock()
            .await
            .retain(|(_, sender)| !sender.is_closed());
    }
}

fn same_origin(a: &Uri, b: &Uri) -> bool {
    a.scheme() == b.scheme() && a.authority() == b.authority()
}
