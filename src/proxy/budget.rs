//! The connection budget: every accepted connection is registered while it lives, with whether
//! it has a request in flight and since when it has been idle. At `[limits].max_connections`,
//! the oldest idle connection is asked to close to make room; when none is idle, the new one is
//! refused. A connection with a request in flight is never closed for room.
//!
//! The registry is touched once per connection (register, unregister) and at the limit (one scan);
//! the per-request cost is a few relaxed atomics on the connection's own [`Conn`], no lock and no
//! allocation. The fast HTTP/1.1 path is not told anything: [`Tracked`] watches its reads and
//! writes instead (bytes read since the last write: a request is in flight; the answer written:
//! idle), and a close is asked of it by shutting down the socket's read side, which it reads as
//! the client closing between requests.
//!
//! The same [`Conn`] carries the connection's set-up deadline: from accept, the first byte, the
//! TLS handshake, a CONNECT head and the handshake inside the tunnel must all be done, and the
//! first request head read, within `[limits].header_read_timeout_ms`; not per stage.

use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tracing::warn;

use crate::metrics::{ConnectionLimitAction, Metrics};

/// Evictions asked for but not yet done, beyond which a new connection is refused rather than
/// admitted over the limit.
const MAX_PENDING_CLOSES: usize = 64;
/// At most one "limit reached" log line this often.
const LIMIT_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a connection asked to close for room has to close by itself (a client that never
/// answers HTTP/2's PING after GOAWAY would keep it open for an idle period): after it, the
/// socket is shut down both ways, as soon as it has nothing in flight.
pub(crate) const EVICTION_GRACE: Duration = Duration::from_secs(1);
/// How often a connection past its eviction grace but with a request in flight is looked at.
const EVICTION_RECHECK: Duration = Duration::from_millis(100);

/// What serves a connection now, which decides how it is asked to close.
const MODE_SETUP: u8 = 0;
/// The fast HTTP/1.1 path: busy and idle are read from its I/O; closed by `shutdown(SHUT_RD)`.
const MODE_FAST: u8 = 1;
/// The general server (hyper): busy while it has requests in flight; closed gracefully.
const MODE_SERVER: u8 = 2;
/// A blind tunnel: idle since its last byte; closed by ending the splice.
const MODE_TUNNEL: u8 = 3;

/// The open connections and the limit.
pub(crate) struct Budget {
    max: usize,
    epoch: Instant,
    setup_timeout: Duration,
    slots: Mutex<Slots>,
    open: AtomicUsize,
    /// Connections asked to close that have not yet.
    pending_closes: AtomicUsize,
    /// Told when one of them has.
    closed: Notify,
    metrics: Arc<Metrics>,
    /// Milliseconds after `epoch` of the last "limit reached" log line, and how many times the
    /// limit was met since.
    last_log_ms: AtomicU64,
    unlogged: AtomicU64,
}

#[derive(Default)]
struct Slots {
    conns: Vec<Option<Arc<Conn>>>,
    free: Vec<usize>,
}

/// One connection, as the budget sees it.
pub(crate) struct Conn {
    slot: usize,
    epoch: Instant,
    opened_ms: u64,
    mode: AtomicU8,
    in_flight: AtomicU32,
    /// Milliseconds after the epoch since which it has had nothing in flight.
    idle_since_ms: AtomicU64,
    closing: AtomicBool,
    close: Notify,
    /// The socket's descriptor while the socket is open (`-1` after), for `shutdown(SHUT_RD)`.
    fd: Mutex<RawFd>,
    setup_deadline: Instant,
    setup_done: AtomicBool,
}

impl Budget {
    pub(crate) fn new(max: usize, setup_timeout: Duration, metrics: Arc<Metrics>) -> Budget {
        metrics.connection_limit(max);
        Budget {
            max,
            epoch: Instant::now(),
            setup_timeout,
            slots: Mutex::new(Slots::default()),
            open: AtomicUsize::new(0),
            pending_closes: AtomicUsize::new(0),
            closed: Notify::new(),
            metrics,
            last_log_ms: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Waits (a little) while many connections asked to close have not yet: the accept loop
    /// waits here, so that a burst of connections is met by closing older idle ones, not by
    /// refusing newcomers while the closes are under way.
    pub(crate) async fn room(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(250);
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.pending_closes.load(Ordering::SeqCst) < MAX_PENDING_CLOSES {
                return;
            }
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                return;
            }
        }
    }

    /// Registers a connection just accepted on `fd`, making room first if the budget is spent;
    /// `None`: no room (every connection has a request in flight), refuse it.
    pub(crate) fn admit(self: &Arc<Self>, fd: RawFd) -> Option<Registration> {
        if self.open.load(Ordering::SeqCst) >= self.max {
            let pending = self.pending_closes.load(Ordering::SeqCst);
            let room = if pending < MAX_PENDING_CLOSES && self.evict_oldest_idle() {
                ConnectionLimitAction::evicted
            } else {
                ConnectionLimitAction::refused
            };
            self.limit_reached(room);
            if room == ConnectionLimitAction::refused {
                return None;
            }
        }
        let now = Instant::now();
        let opened_ms = self.now_ms();
        let mut slots = self.lock();
        let slot = slots.free.pop().unwrap_or_else(|| {
            slots.conns.push(None);
            slots.conns.len() - 1
        });
        let conn = Arc::new(Conn {
            slot,
            epoch: self.epoch,
            opened_ms,
            mode: AtomicU8::new(MODE_SETUP),
            in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(opened_ms),
            closing: AtomicBool::new(false),
            close: Notify::new(),
            fd: Mutex::new(fd),
            setup_deadline: now + self.setup_timeout,
            setup_done: AtomicBool::new(false),
        });
        slots.conns[slot] = Some(Arc::clone(&conn));
        drop(slots);
        let open = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        self.metrics.connections_open(open);
        Some(Registration {
            budget: Arc::clone(self),
            conn,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the connection idle the longest to close. `false` when none is idle.
    fn evict_oldest_idle(&self) -> bool {
        let oldest = {
            let slots = self.lock();
            slots
                .conns
                .iter()
                .flatten()
                .filter_map(|conn| conn.idle_since().map(|since| (since, conn)))
                .min_by_key(|(since, conn)| (*since, conn.opened_ms))
                .map(|(_, conn)| Arc::clone(conn))
        };
        match oldest {
            Some(conn) => {
                if conn.ask_to_close() {
                    self.pending_closes.fetch_add(1, Ordering::SeqCst);
                    conn.hard_close_after(EVICTION_GRACE);
                }
                true
            }
            None => false,
        }
    }

    fn limit_reached(&self, action: ConnectionLimitAction) {
        self.metrics.connection_limited(action);
        let unlogged = self.unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.now_ms();
        let last = self.last_log_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= LIMIT_LOG_EVERY.as_millis() as u64;
        if due
            && self
                .last_log_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.unlogged.store(0, Ordering::Relaxed);
            warn!(
                max_connections = self.max,
                times = unlogged,
                last_action = ?action,
                "connection limit reached ([limits].max_connections): the oldest idle connections are closed to make room, and new connections are refused while every connection has a request in flight"
            );
        }
    }

    fn unregister(&self, conn: &Conn) {
        {
            let mut slots = self.lock();
            slots.conns[conn.slot] = None;
            slots.free.push(conn.slot);
        }
        if conn.closing.load(Ordering::SeqCst) {
            self.pending_closes.fetch_sub(1, Ordering::SeqCst);
            self.closed.notify_waiters();
        }
        let open = self.open.fetch_sub(1, Ordering::SeqCst) - 1;
        self.metrics.connections_open(open);
    }
}

impl Conn {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Since when it has had nothing in flight; `None` while busy, or once asked to close.
    fn idle_since(&self) -> Option<u64> {
        if self.closing.load(Ordering::SeqCst) || self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(self.idle_since_ms.load(Ordering::SeqCst))
    }

    /// When it went idle; `None` while it has something in flight.
    pub(crate) fn idle_instant(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(self.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst)))
    }

    /// Asks it to close (it is idle: its client certificate has ended, `connection.rs`), and
    /// shuts it down after [`EVICTION_GRACE`] if the client has not closed it by then.
    pub(crate) fn close_idle(self: &Arc<Self>) {
        if self.ask_to_close() {
            self.hard_close_after(EVICTION_GRACE);
        }
    }

    /// Asks it to close at its next idle moment. `true` the first time.
    fn ask_to_close(&self) -> bool {
        if self.closing.swap(true, Ordering::SeqCst) {
            return false;
        }
        let mode = self.mode.load(Ordering::SeqCst);
        if mode == MODE_SETUP || mode == MODE_FAST {
            self.shut_read();
        }
        self.close.notify_waiters();
        true
    }

    /// Shuts the socket down both ways once `grace` has passed and it has nothing in flight,
    /// unless it has closed by then: every stage serving it then reads EOF and fails its writes,
    /// whatever the client does.
    fn hard_close_after(self: &Arc<Self>, grace: Duration) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let conn = Arc::clone(self);
        runtime.spawn(async move {
            tokio::time::sleep(grace).await;
            loop {
                if *conn.fd.lock().unwrap_or_else(|e| e.into_inner()) < 0 {
                    return;
                }
                if conn.in_flight.load(Ordering::SeqCst) == 0 {
                    conn.shut(libc::SHUT_RDWR);
                    return;
                }
                tokio::time::sleep(EVICTION_RECHECK).await;
            }
        });
    }

    /// The fast path and the set-up stages read EOF, as if the client had closed.
    fn shut_read(&self) {
        self.shut(libc::SHUT_RD);
    }

    fn shut(&self, how: libc::c_int) {
        let fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        if *fd >= 0 {
            // SAFETY: `shutdown(2)` on a descriptor touches no memory of this process.
            // The descriptor is still this connection's socket: the lock is held, and
            // `forget_fd` (which takes it) runs before the socket is closed.
            unsafe { libc::shutdown(*fd, how) };
        }
    }

    /// Whether it has been asked to close.
    pub(crate) fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Resolves once it is asked to close.
    pub(crate) async fn close_requested(&self) {
        let notified = self.close.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.closing() {
            return;
        }
        notified.await;
    }

    fn forget_fd(&self) {
        *self.fd.lock().unwrap_or_else(|e| e.into_inner()) = -1;
    }

    /// The fast path serves it from now on (busy and idle read from its I/O).
    pub(crate) fn fast_path(&self) {
        self.in_flight.store(0, Ordering::SeqCst);
        self.mode.store(MODE_FAST, Ordering::SeqCst);
        // Asked to close while another stage served it (the general server, before a CONNECT
        // was intercepted): the fast path is told as it would have been.
        if self.closing() {
            self.shut_read();
        }
    }

    /// The general server serves it from now on (busy while it has requests in flight).
    pub(crate) fn server(&self) {
        self.in_flight.store(0, Ordering::SeqCst);
        self.idle_since_ms.store(self.now_ms(), Ordering::SeqCst);
        self.mode.store(MODE_SERVER, Ordering::SeqCst);
    }

    /// A blind tunnel splices it from now on (idle since its last byte).
    pub(crate) fn tunnel(&self) {
        self.in_flight.store(0, Ordering::SeqCst);
        self.idle_since_ms.store(self.now_ms(), Ordering::SeqCst);
        self.mode.store(MODE_TUNNEL, Ordering::SeqCst);
    }

    /// Bytes moved through a blind tunnel.
    pub(crate) fn touched(&self) {
        self.idle_since_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// A request starts on the general server; it ends when the guard is dropped.
    pub(crate) fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight {
            conn: Arc::clone(self),
        }
    }

    /// The set-up is over: the first request head is in (or a blind tunnel spliced).
    pub(crate) fn setup_done(&self) {
        self.setup_done.store(true, Ordering::Relaxed);
    }

    /// Resolves when the set-up deadline passes with the set-up not done; never otherwise.
    pub(crate) async fn setup_expired(&self) {
        tokio::time::sleep_until(self.setup_deadline.into()).await;
        if self.setup_done.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    }

    /// The fast path read bytes: a request is in flight until something is written back.
    #[inline]
    fn read_some(&self) {
        if self.mode.load(Ordering::Relaxed) == MODE_FAST
            && self.in_flight.load(Ordering::Relaxed) == 0
        {
            self.in_flight.store(1, Ordering::SeqCst);
        }
    }

    /// The fast path wrote bytes: the answer is going out; idle from the first such write.
    #[inline]
    fn wrote_some(&self) {
        if self.mode.load(Ordering::Relaxed) == MODE_FAST
            && self.in_flight.load(Ordering::Relaxed) != 0
        {
            self.idle_since_ms.store(self.now_ms(), Ordering::SeqCst);
            self.in_flight.store(0, Ordering::SeqCst);
        }
    }
}

/// A request in flight on the general server.
pub(crate) struct InFlight {
    conn: Arc<Conn>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let conn = &self.conn;
        conn.idle_since_ms.store(conn.now_ms(), Ordering::SeqCst);
        // Saturating: a mode switch that reset the count must not leave it wrapped (busy forever).
        let _ = conn
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }
}

/// A connection's place in the budget, held while its socket is open.
pub(crate) struct Registration {
    budget: Arc<Budget>,
    conn: Arc<Conn>,
}

impl Registration {
    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    /// Forgets the socket's descriptor before the socket is handed where it may be closed.
    pub(crate) fn forget_fd(&self) {
        self.conn.forget_fd();
    }

    pub(crate) fn set_fd(&self, fd: RawFd) {
        *self.conn.fd.lock().unwrap_or_else(|e| e.into_inner()) = fd;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.conn.forget_fd();
        self.budget.unregister(&self.conn);
    }
}

/// The accepted socket and its registration: the registration (and with it the descriptor the
/// budget may shut down) goes before the socket is closed.
pub(crate) struct Socket<S> {
    registration: Registration,
    stream: S,
}

impl<S> Socket<S> {
    pub(crate) fn new(registration: Registration, stream: S) -> Socket<S> {
        Socket {
            registration,
            stream,
        }
    }
}

impl<S> Drop for Socket<S> {
    fn drop(&mut self) {
        // Before `stream` closes the descriptor.
        self.registration.forget_fd();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Socket<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Socket<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The HTTP stream of a connection (plain, inside TLS, or inside a tunnel), watched for the
/// budget: bytes read mean a request is in flight until something is written back; and for the
/// set-up deadline: the first request head ends at the first empty line, unless it is a CONNECT
/// (whose set-up goes on inside the tunnel).
pub(crate) struct Tracked<I> {
    io: I,
    conn: Arc<Conn>,
    /// Until the first head's end is seen: its first bytes, and the last two bytes read.
    scan: Option<HeadScan>,
}

struct HeadScan {
    start: [u8; 8],
    seen: usize,
    tail: [u8; 2],
}

impl<I> Tracked<I> {
    pub(crate) fn new(io: I, conn: Arc<Conn>) -> Tracked<I> {
        let scan = (!conn.setup_done.load(Ordering::Relaxed)).then_some(HeadScan {
            start: [0; 8],
            seen: 0,
            tail: [0; 2],
        });
        Tracked { io, conn, scan }
    }

    /// Looks for the end of the first head in bytes just read.
    fn scan(&mut self, bytes: &[u8]) {
        let Some(scan) = &mut self.scan else {
            return;
        };
        for &b in bytes {
            // Empty lines before the request line: skipped, as httparse and hyper skip them.
            if scan.seen == 0 && (b == b'\r' || b == b'\n') {
                continue;
            }
            if scan.seen < scan.start.len() {
                scan.start[scan.seen] = b;
            }
            scan.seen += 1;
            // An empty line: LF CR LF, or LF LF.
            let end = b == b'\n' && (scan.tail[1] == b'\n' || scan.tail == *b"\n\r");
            scan.tail = [scan.tail[1], b];
            if end {
                if &scan.start != b"CONNECT " {
                    self.conn.setup_done();
                }
                self.scan = None;
                return;
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.read_some();
            if self.scan.is_some() {
                let this = &mut *self;
                this.scan(&buf.filled()[before..]);
            }
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.wrote_some();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.wrote_some();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max: usize) -> Arc<Budget> {
        Arc::new(Budget::new(
            max,
            Duration::from_secs(10),
            Arc::new(Metrics::new()),
        ))
    }

    #[test]
    fn the_oldest_idle_connection_makes_room_and_a_busy_one_never_does() {
        let budget = budget(3);
        let a = budget.admit(-1).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let b = budget.admit(-1).unwrap();
        let c = budget.admit(-1).unwrap();
        // `a` is busy; `b` went idle before `c`.
        a.conn().server();
        let _request = a.conn().begin_request();
        b.conn().server();
        std::thread::sleep(Duration::from_millis(5));
        c.conn().server();
        let d = budget.admit(-1).expect("room is made");
        assert!(
            !a.conn().closing(),
            "a connection with a request in flight stays"
        );
        assert!(b.conn().closing(), "the oldest idle one is asked to close");
        assert!(!c.conn().closing());
        drop(b);
        let _d_busy = {
            d.conn().server();
            d.conn().begin_request()
        };
        let _c_busy = c.conn().begin_request();
        // Everything busy: the next is refused.
        assert!(budget.admit(-1).is_none());
        assert_eq!(budget.open.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn the_first_head_ends_the_set_up_unless_it_is_a_connect() {
        let scanned = |chunks: &[&[u8]]| {
            let budget = budget(1);
            let place = budget.admit(-1).unwrap();
            let conn = Arc::clone(place.conn());
            let mut tracked = Tracked::new((), Arc::clone(&conn));
            for chunk in chunks {
                tracked.scan(chunk);
            }
            conn.setup_done.load(Ordering::Relaxed)
        };
        assert!(scanned(&[b"POST / HTTP/1.1\r\nHost: x\r\n\r\n"]));
        assert!(scanned(&[
            b"POST / HTTP/1.1\r\nHost: x\r",
            b"\n",
            b"\r",
            b"\nbody"
        ]));
        assert!(scanned(&[b"POST / HTTP/1.1\nHost: x\n\n"]));
        assert!(!scanned(&[b"POST / HTTP/1.1\r\nHost: x\r\n"]));
        assert!(!scanned(&[b"CONNECT kms:443 HTTP/1.1\r\n\r\n"]));
        assert!(!scanned(&[b"CONN", b"ECT kms:443 HTTP/1.1\r\n", b"\r\n"]));
        // Empty lines before a request line are skipped, as HTTP/1.1 parsers skip them.
        assert!(!scanned(&[b"\r\nCONNECT kms:443 HTTP/1.1\r\n\r\n"]));
        assert!(!scanned(&[
            b"\r\n\n\r",
            b"\nCONNECT kms:443 HTTP/1.1\r\n\r\n"
        ]));
        assert!(scanned(&[b"\r\n\r\nPOST / HTTP/1.1\r\nHost: x\r\n\r\n"]));
    }
}
