//! Slow and idle clients (contract section 3 `[limits]`, research note C.8): a request head that
//! trickles in is cut off after `header_read_timeout_ms`, a tag-bearing body that trickles in gets
//! 408 after `body_read_timeout_ms` (audited as a deny, never forwarded), idle connections (new
//! or kept alive) are closed after `header_read_timeout_ms`, the documented idle timeout, and
//! 10,000 idle connections neither stop a new client nor cost much memory.
//!
//! Timing assertions are bounds with wide margins: a timeout may fire up to [`MARGIN`] late,
//! never early.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::child::{self, start_child, ChildOptions, ChildProxy};
use common::raw::{self, RawConn, RawRequest, TrickleEnd};
use common::sentinel::assert_nothing_forwarded;
use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
const TAG_RESOURCE: &str = "TrentService.TagResource";
const ENCRYPT: &str = "TrentService.Encrypt";
/// One byte this often: five bytes a second, far too slow to finish a request in time.
const TRICKLE: Duration = Duration::from_millis(200);
/// How late a timeout may fire and still pass.
const MARGIN: Duration = Duration::from_secs(3);

fn limits(header_ms: u64, body_ms: u64) -> ProxyConfig {
    ProxyConfig {
        limits: format!("header_read_timeout_ms = {header_ms}\nbody_read_timeout_ms = {body_ms}"),
        ..ProxyConfig::default()
    }
}

/// [`limits`] with an idle timeout of its own.
fn limits_with_idle(header_ms: u64, body_ms: u64, idle_ms: u64) -> ProxyConfig {
    ProxyConfig {
        limits: format!(
            "header_read_timeout_ms = {header_ms}\nbody_read_timeout_ms = {body_ms}\nidle_timeout_ms = {idle_ms}"
        ),
        ..ProxyConfig::default()
    }
}

fn allowed_tag_body() -> String {
    format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:owner","TagValue":"payments"}}]}}"#)
}

fn encrypt_body() -> String {
    format!(r#"{{"KeyId":"{KEY}","Plaintext":"aGVsbG8="}}"#)
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// A signed Encrypt on a new connection gets 200 from the fake within 5 s.
async fn assert_served(case: &str, fake: &FakeKms, addr: SocketAddr) {
    let before = fake.count();
    let body = encrypt_body();
    let request = RawRequest::signed_kms(&fake.host(), ENCRYPT, body.as_bytes()).to_bytes();
    let response = tokio::time::timeout(Duration::from_secs(5), raw::try_send(addr, &request))
        .await
        .unwrap_or_else(|_| panic!("{case}: a new client got no answer within 5 s"))
        .unwrap_or_else(|e| panic!("{case}: a new client failed: {e}"));
    assert_eq!(
        response.status,
        200,
        "{case}: a new client got {} {}",
        response.status,
        response.body_str()
    );
    let recorded = fake
        .wait_for_requests(before + 1, Duration::from_secs(5))
        .await;
    assert_eq!(&recorded[before].body[..], body.as_bytes(), "{case}");
    recorded[before].verified();
}

/// Waits (up to `timeout`) for the peer to close; returns how long that took from `since`.
async fn closed_after(conn: &mut RawConn, since: Instant, timeout: Duration) -> Option<Duration> {
    conn.is_closed_within(timeout)
        .await
        .then(|| since.elapsed())
}

// ------------------------------------------------------------------------- slow request heads

/// Trickles a whole request; the proxy must stop it long before the head is complete.
async fn trickle_head(case: &str, addr: SocketAddr, request: RawRequest, header_timeout: Duration) {
    let head_len = request.head_bytes().len();
    let mut conn = RawConn::connect(addr).await.unwrap();
    let trickled = conn.trickle(&request.to_bytes(), TRICKLE).await;
    eprintln!(
        "{case}: {:?} after {} ms, {} of {head_len} head bytes sent",
        trickled.end,
        ms(trickled.elapsed),
        trickled.sent
    );
    assert_ne!(
        trickled.end,
        TrickleEnd::AllSent,
        "{case}: the proxy waited for the whole trickled request"
    );
    assert!(
        trickled.sent < head_len / 2,
        "{case}: {} of {head_len} head bytes were accepted before the cut-off",
        trickled.sent
    );
    assert!(
        trickled.elapsed >= header_timeout.mul_f64(0.9),
        "{case}: cut off after {} ms, before header_read_timeout_ms = {}",
        ms(trickled.elapsed),
        ms(header_timeout)
    );
    assert!(
        trickled.elapsed <= header_timeout + MARGIN,
        "{case}: cut off only after {} ms (header_read_timeout_ms = {})",
        ms(trickled.elapsed),
        ms(header_timeout)
    );
    if trickled.end == TrickleEnd::Answered {
        // hyper closes without an answer; a 408 would do as well.
        let response = conn.read_response().await.unwrap();
        assert_eq!(response.status, 408, "{case}: {}", response.body_str());
        assert!(conn.is_closed_within(MARGIN).await, "{case}: still open");
    }
}

#[tokio::test]
async fn a_trickled_request_head_is_cut_off_after_header_read_timeout() {
    let header_timeout = Duration::from_millis(1000);
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(&fake, limits(1000, 5000)).await;
    let host = fake.host();
    let tag = RawRequest::signed_kms(&host, TAG_RESOURCE, allowed_tag_body().as_bytes());
    let enc = RawRequest::signed_kms(&host, ENCRYPT, encrypt_body().as_bytes());
    tokio::join!(
        trickle_head("TagResource head", proxy.addr, tag, header_timeout),
        trickle_head("Encrypt head", proxy.addr, enc, header_timeout),
    );
    assert_nothing_forwarded("trickled heads", &fake, proxy.addr).await;
    assert_served("after trickled heads", &fake, proxy.addr).await;
}

#[tokio::test]
async fn a_connection_stalled_inside_the_http2_preface_is_closed() {
    let header_timeout = Duration::from_millis(1000);
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(&fake, limits(1000, 1000)).await;
    let stall = |sent: &'static [u8]| async move {
        let mut conn = RawConn::connect(proxy.addr).await.unwrap();
        let started = Instant::now();
        conn.write(sent).await.unwrap();
        let closed = closed_after(&mut conn, started, header_timeout + MARGIN).await;
        (sent, closed, started.elapsed())
    };
    let results = tokio::join!(stall(b"P"), stall(b"PRI * HTTP/2.0\r\n"));
    let still_open: Vec<String> = [results.0, results.1]
        .into_iter()
        .filter(|(_, closed, _)| closed.is_none())
        .map(|(sent, _, waited)| {
            format!(
                "sent {:?}, still open after {} ms",
                String::from_utf8_lossy(sent),
                ms(waited)
            )
        })
        .collect();
    assert!(
        still_open.is_empty(),
        "connections stalled inside the HTTP/2 preface outlive header_read_timeout_ms = {}: {}",
        ms(header_timeout),
        still_open.join("; ")
    );
    assert_nothing_forwarded("stalled preface", &fake, proxy.addr).await;
}

// ------------------------------------------------------------------------- slow request bodies

/// Sends the head at once, trickles the body; expects 408 after the body timeout, a deny record,
/// nothing forwarded, and the connection closed.
async fn trickle_body(
    case: &str,
    proxy: &TestProxy,
    head: &[u8],
    body: &[u8],
    body_timeout: Duration,
) -> (u16, Value) {
    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    conn.write(head).await.unwrap();
    let trickled = conn.trickle(body, TRICKLE).await;
    eprintln!(
        "{case}: {:?} after {} ms, {} of {} body bytes sent",
        trickled.end,
        ms(trickled.elapsed),
        trickled.sent,
        body.len()
    );
    assert_eq!(
        trickled.end,
        TrickleEnd::Answered,
        "{case}: expected a 408 while the body trickled in"
    );
    assert!(
        trickled.sent < body.len(),
        "{case}: the whole body was sent"
    );
    assert!(
        trickled.elapsed >= body_timeout.mul_f64(0.9),
        "{case}: answered after {} ms, before body_read_timeout_ms = {}",
        ms(trickled.elapsed),
        ms(body_timeout)
    );
    assert!(
        trickled.elapsed <= body_timeout + MARGIN,
        "{case}: answered only after {} ms (body_read_timeout_ms = {})",
        ms(trickled.elapsed),
        ms(body_timeout)
    );
    let response = conn.read_response().await.unwrap();
    let text = response.body_str();
    assert_eq!(response.status, 408, "{case}: {text}");
    assert_eq!(
        response.header("content-type"),
        Some("application/x-amz-json-1.1"),
        "{case}"
    );
    assert_eq!(
        response.json()["__type"],
        "RequestTimeoutException",
        "{case}: {text}"
    );
    assert_eq!(
        response.header("x-kms-tag-guard"),
        Some("body-timeout"),
        "{case}: {:?}",
        response.headers
    );
    // The rest of the body is never read: the connection closes after the answer.
    assert!(
        conn.is_closed_within(MARGIN).await,
        "{case}: the connection stayed open after the 408"
    );

    let request_id = response
        .header("x-amzn-requestid")
        .unwrap_or_else(|| panic!("{case}: no x-amzn-RequestId"))
        .to_owned();
    let audit = proxy.audit();
    let record = audit
        .iter()
        .find(|r| r["event"] == "decision" && r["request_id"] == request_id.as_str())
        .unwrap_or_else(|| panic!("{case}: no decision record for {request_id}: {audit:#?}"))
        .clone();
    assert_eq!(record["decision"], "deny", "{case}: {record}");
    assert_eq!(record["operation"], "TagResource", "{case}: {record}");
    assert!(
        record["violations"]
            .as_array()
            .is_some_and(|v| v.iter().any(|v| v["rule"] == "request")),
        "{case}: {record}"
    );
    (response.status, record)
}

#[tokio::test]
async fn a_trickled_tag_bearing_body_gets_408_after_body_read_timeout() {
    let body_timeout = Duration::from_millis(1000);
    let fake = FakeKms::start().await;
    // A long header timeout: only the body timeout can end these requests.
    let proxy = start_proxy_with(&fake, limits(10_000, 1000)).await;
    let host = fake.host();
    let body = allowed_tag_body();

    // Content-Length framing.
    let request = RawRequest::signed_kms(&host, TAG_RESOURCE, body.as_bytes());
    let length_head = request.head_bytes();

    // Chunked framing: one chunk, trickled with its framing.
    let mut request = RawRequest::signed_kms(&host, TAG_RESOURCE, body.as_bytes());
    request
        .remove_header("Content-Length")
        .add_header("Transfer-Encoding", "chunked");
    let chunked_head = request.head_bytes();
    let mut chunked_body = format!("{:x}\r\n", body.len()).into_bytes();
    chunked_body.extend_from_slice(body.as_bytes());
    chunked_body.extend_from_slice(b"\r\n0\r\n\r\n");

    tokio::join!(
        trickle_body(
            "Content-Length body",
            &proxy,
            &length_head,
            body.as_bytes(),
            body_timeout
        ),
        trickle_body(
            "chunked body",
            &proxy,
            &chunked_head,
            &chunked_body,
            body_timeout
        ),
    );
    let audit = proxy.audit();
    assert!(
        audit.iter().all(|r| r["event"] != "outcome"),
        "an outcome record means something was forwarded: {audit:#?}"
    );
    assert_nothing_forwarded("trickled bodies", &fake, proxy.addr).await;
    assert_served("after trickled bodies", &fake, proxy.addr).await;
}

// ------------------------------------------------------------------------- idle connections

/// On one keep-alive connection: a request, another one after half the idle timeout (the timer
/// restarts), then silence. The connection must stay open for most of the idle timeout after the
/// last answer, and be closed soon after it.
async fn keep_alive_then_idle(
    case: &str,
    fake: &FakeKms,
    addr: SocketAddr,
    target: &str,
    body: &str,
    idle_timeout: Duration,
) {
    let mut conn = RawConn::connect(addr).await.unwrap();
    for round in 0..2 {
        if round == 1 {
            // Deliberate: the client idles half the idle timeout, which the test is about.
            tokio::time::sleep(idle_timeout / 2).await;
        }
        let request = RawRequest::signed_kms(&fake.host(), target, body.as_bytes());
        conn.write(&request.to_bytes()).await.unwrap();
        let response = conn
            .read_response()
            .await
            .unwrap_or_else(|e| panic!("{case}: round {round}: {e}"));
        assert_eq!(
            response.status,
            200,
            "{case}: round {round}: {}",
            response.body_str()
        );
        assert_ne!(
            response.header("connection").map(str::to_ascii_lowercase),
            Some("close".into()),
            "{case}: the proxy did not keep the connection alive"
        );
        // The hint that lets clients retire the connection before the proxy closes it.
        assert_eq!(
            response.header("keep-alive"),
            Some(format!("timeout={}", idle_timeout.as_secs()).as_str()),
            "{case}: round {round}"
        );
    }
    let idle_since = Instant::now();
    let early = idle_timeout.mul_f64(0.75);
    assert!(
        !conn.is_closed_within(early).await,
        "{case}: an idle keep-alive connection was closed after {} ms, well before \
         idle_timeout_ms = {}",
        ms(idle_since.elapsed()),
        ms(idle_timeout)
    );
    let closed = closed_after(&mut conn, idle_since, idle_timeout + MARGIN - early).await;
    let closed = closed.unwrap_or_else(|| {
        panic!(
            "{case}: an idle keep-alive connection is still open after {} ms \
             (idle_timeout_ms = {})",
            ms(idle_since.elapsed()),
            ms(idle_timeout)
        )
    });
    eprintln!(
        "MEASURE keep-alive-idle case={case:?} idle_timeout_ms={} closed_after_idle_ms={}",
        ms(idle_timeout),
        ms(closed)
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout_not_header_read_timeout() {
    // The header read timeout is shorter: an idle connection outlives it.
    let idle_timeout = Duration::from_millis(2000);
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(&fake, limits_with_idle(800, 2000, 2000)).await;
    let (tag, enc) = (allowed_tag_body(), encrypt_body());
    tokio::join!(
        keep_alive_then_idle(
            "after TagResource",
            &fake,
            proxy.addr,
            TAG_RESOURCE,
            &tag,
            idle_timeout
        ),
        keep_alive_then_idle(
            "after Encrypt",
            &fake,
            proxy.addr,
            ENCRYPT,
            &enc,
            idle_timeout
        ),
    );
    assert_eq!(fake.count(), 4);
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_header_read_timeout() {
    let idle_timeout = Duration::from_millis(2000);
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(&fake, limits(2000, 2000)).await;
    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    let connected = Instant::now();
    let early = idle_timeout.mul_f64(0.75);
    assert!(
        !conn.is_closed_within(early).await,
        "a silent connection was closed after {} ms, well before header_read_timeout_ms = {}",
        ms(connected.elapsed()),
        ms(idle_timeout)
    );
    let closed = closed_after(&mut conn, connected, idle_timeout + MARGIN - early)
        .await
        .unwrap_or_else(|| {
            panic!(
                "a silent connection is still open after {} ms (header_read_timeout_ms = {})",
                ms(connected.elapsed()),
                ms(idle_timeout)
            )
        });
    eprintln!(
        "MEASURE silent-connection header_read_timeout_ms={} closed_after_ms={}",
        ms(idle_timeout),
        ms(closed)
    );
    assert_nothing_forwarded("silent connection", &fake, proxy.addr).await;
    assert_served("after a silent connection", &fake, proxy.addr).await;
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_idle_timeout() {
    use http_body_util::{BodyExt, Full};
    let idle_timeout = Duration::from_millis(1000);
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(&fake, limits_with_idle(1000, 1000, 1000)).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let mut conn = tokio::spawn(conn);
    let host = fake.host();
    let body = encrypt_body();
    let signed = sigv4::sign(
        "POST",
        &host,
        ENCRYPT,
        body.as_bytes(),
        ACCESS_KEY_ID,
        SECRET_KEY,
        REGION,
        None,
    );
    let request = http::Request::post(format!("http://{host}/"))
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amz-target", ENCRYPT)
        .header("x-amz-date", &signed.amz_date)
        .header("authorization", &signed.authorization)
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let _ = response.into_body().collect().await.unwrap();
    let idle_since = Instant::now();
    // `sender` stays alive: the client keeps the connection open; only the proxy may close it.
    let ended = tokio::time::timeout(idle_timeout + MARGIN, &mut conn).await;
    assert!(
        ended.is_ok(),
        "an idle HTTP/2 connection is still open after {} ms (idle_timeout_ms = {})",
        ms(idle_since.elapsed()),
        ms(idle_timeout)
    );
    drop(sender);
    conn.abort();
}

// ------------------------------------------------------------------------- many idle connections

const IDLE_CONNECTIONS: usize = 10_000;
/// A request head that never ends.
const PARTIAL_HEAD: &[u8] = b"POST / HTTP/1.1\r\nHost: kms.us-east-1.amazonaws.com\r\n";

/// How many connections may wait in the proxy's accept queue: its listen backlog is 128 (tokio's
/// `TcpListener::bind` uses mio's, std's value); more, and the kernel drops handshakes that then
/// take a second or more of SYN retries to complete.
const UNACCEPTED: usize = 100;

/// Opens `n` connections to the proxy, [`UNACCEPTED`] at a time, each batch once the proxy has
/// accepted the one before (it held `fds_before` descriptors before the first).
async fn open_connections(proxy: &ChildProxy, fds_before: usize, n: usize) -> Vec<TcpStream> {
    let addr = proxy.addr;
    let mut open = Vec::with_capacity(n);
    while open.len() < n {
        let mut batch = JoinSet::new();
        for _ in 0..(n - open.len()).min(UNACCEPTED) {
            batch.spawn(async move { TcpStream::connect(addr).await });
        }
        while let Some(joined) = batch.join_next().await {
            let stream = joined
                .unwrap()
                .unwrap_or_else(|e| panic!("connection {} failed: {e}", open.len() + 1));
            open.push(stream);
        }
        let accepted = fds_before + open.len();
        wait_for_fds(proxy, Duration::from_secs(10), |fds| fds >= accepted).await;
    }
    open
}

/// Waits (up to `timeout`) until the proxy's open descriptor count satisfies `done`.
async fn wait_for_fds(
    proxy: &ChildProxy,
    timeout: Duration,
    done: impl Fn(usize) -> bool,
) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let fds = proxy.open_fds();
        if done(fds) || Instant::now() > deadline {
            return fds;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn per_connection_bytes(with_kib: u64, before_kib: u64, connections: usize) -> u64 {
    with_kib.saturating_sub(before_kib) * 1024 / connections as u64
}

/// The proxy runs as a child process so its descriptors and the test's 10,000 client sockets
/// count against different limits. The proxy keeps two descriptors per connection in hand
/// (`max_connections` is lowered to fit its limit), so where its hard limit is below about
/// 20,300 the test opens as many as that allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_do_not_stop_a_new_client() {
    let started = Instant::now();
    let needed = IDLE_CONNECTIONS as u64 + 1024;
    let own = child::raise_own_nofile(needed);
    assert!(
        own >= needed,
        "the test process may open only {own} files; it needs {needed}"
    );
    let fake = FakeKms::start().await;
    let mut opts = ChildOptions::new(&fake.url());
    // Longer than the test: the connections stay open while they are measured; and a budget
    // above them, so that none is closed to make room (the connection budget tests below cover that).
    opts.config.limits = "header_read_timeout_ms = 25000\nmax_connections = 20000".into();
    opts.nofile = Some(65_536);
    let mut proxy = start_child(opts).await;
    let limit = proxy.nofile_limit().unwrap_or(0);
    assert!(
        limit >= needed,
        "the proxy may open only {limit} files; it needs {needed}"
    );
    let fits = kms_tag_guard::fds::connections_within(limit) as usize;
    let idle_connections = IDLE_CONNECTIONS.min(fits - 1);
    eprintln!(
        "opening {idle_connections} idle connections (the proxy's descriptor limit is {limit})"
    );

    // Warm up (lazy initialisation, the upstream pool) before the baseline.
    assert_served("warm-up", &fake, proxy.addr).await;
    // Deliberate: a quiet moment before the baseline figures (a measurement, not a wait).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fds_before = proxy.open_fds();
    let rss_before = proxy.rss_kib().expect("VmRSS");

    // 10,000 connections that say nothing (the first-byte wait in the accept loop).
    let opening = Instant::now();
    let mut conns = open_connections(&proxy, fds_before, idle_connections).await;
    let connect_ms = ms(opening.elapsed());
    let fds = wait_for_fds(&proxy, Duration::from_secs(15), |n| {
        n >= fds_before + idle_connections
    })
    .await;
    assert!(
        fds >= fds_before + idle_connections,
        "the proxy accepted only {} of {idle_connections} connections in 15 s; stderr:\n{}",
        fds.saturating_sub(fds_before),
        proxy.stderr()
    );
    let open_ms = ms(opening.elapsed());
    // Deliberate: the RSS settles before it is measured (a figure, not a condition).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_silent = proxy.rss_kib().expect("VmRSS");
    let serving = Instant::now();
    assert_served("with 10000 silent connections", &fake, proxy.addr).await;
    let served_silent_ms = ms(serving.elapsed());

    // The same connections each send part of a request head (hyper's head reader).
    for conn in &mut conns {
        conn.write_all(PARTIAL_HEAD).await.expect("partial head");
    }
    // Deliberate: time for the proxy to read 10,000 partial heads before the RSS figure; nothing
    // outside the proxy says it has (a measurement, not a wait for a condition).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss_partial = proxy.rss_kib().expect("VmRSS");
    let serving = Instant::now();
    assert_served("with 10000 partial heads", &fake, proxy.addr).await;
    let served_partial_ms = ms(serving.elapsed());
    assert_eq!(
        proxy.open_fds(),
        fds,
        "the proxy dropped connections before header_read_timeout_ms"
    );

    drop(conns);
    let fds_after = wait_for_fds(&proxy, Duration::from_secs(15), |n| n <= fds_before + 8).await;
    assert!(
        fds_after <= fds_before + 8,
        "the proxy still holds {} descriptors after the clients closed ({fds_before} before)",
        fds_after
    );
    // Deliberate: the RSS settles before it is measured (a figure, not a condition).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = proxy.rss_kib().expect("VmRSS");
    let peak = proxy.peak_rss_kib().unwrap_or(0);
    assert_served("after the idle connections closed", &fake, proxy.addr).await;

    eprintln!(
        "MEASURE idle-connections connections={idle_connections} rss_before_kib={rss_before} \
         rss_with_10000_silent_kib={rss_silent} rss_with_10000_partial_head_kib={rss_partial} \
         rss_after_close_kib={rss_after} vm_hwm_kib={peak} \
         per_connection_silent_bytes={} per_connection_partial_head_bytes={} \
         proxy_fds_before={fds_before} proxy_fds_with={fds} proxy_fds_after={fds_after} \
         connect_ms={connect_ms} open_ms={open_ms} new_client_ms_silent={served_silent_ms} \
         new_client_ms_partial={served_partial_ms}",
        per_connection_bytes(rss_silent, rss_before, idle_connections),
        per_connection_bytes(rss_partial, rss_before, idle_connections),
    );
    const GIB_IN_KIB: u64 = 1 << 20;
    for (what, kib) in [
        ("silent", rss_silent),
        ("partial heads", rss_partial),
        ("peak", peak),
    ] {
        assert!(kib < GIB_IN_KIB, "{what}: RSS {kib} KiB is over 1 GiB");
    }

    let status = tokio::task::spawn_blocking(move || {
        let status = proxy.stop();
        (status, proxy.stderr())
    })
    .await
    .unwrap();
    assert!(
        status.0.is_some_and(|s| s.success()),
        "the proxy did not stop cleanly: {:?}\n{}",
        status.0,
        status.1
    );
    eprintln!(
        "MEASURE idle-connections test_total_ms={}",
        ms(started.elapsed())
    );
}

// ------------------------------------------------------------------------- set-up deadline

/// The first byte and the first request head share one deadline, `header_read_timeout_ms`
/// from accept: a client that takes most of it to send its first byte, then most of it again
/// for the rest of the head, is cut off (each stage alone would have passed).
#[tokio::test]
async fn the_connection_set_up_is_one_deadline_not_one_per_stage() {
    let fake = FakeKms::start().await;
    let timeout = Duration::from_millis(1500);
    let proxy = start_proxy_with(&fake, limits(ms(timeout) as u64, 10_000)).await;
    let request =
        RawRequest::signed_kms(&fake.host(), ENCRYPT, encrypt_body().as_bytes()).to_bytes();
    let since = Instant::now();
    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    // Deliberate, the test's subject: two thirds of the deadline before the first byte, two
    // thirds again before the rest.
    tokio::time::sleep(timeout.mul_f64(0.66)).await;
    conn.write(&request[..1]).await.unwrap();
    tokio::time::sleep(timeout.mul_f64(0.66)).await;
    let _ = conn.write(&request[1..]).await;
    let answer = conn.read_response_within(MARGIN).await;
    assert!(
        answer.is_err(),
        "a set-up of {} ms was served (header_read_timeout_ms = {}): {:?}",
        ms(since.elapsed()),
        ms(timeout),
        answer.map(|r| r.status)
    );
    assert!(
        closed_after(&mut conn, since, MARGIN).await.is_some(),
        "the connection is still open"
    );
    assert_nothing_forwarded("set-up over two stages", &fake, proxy.addr).await;

    // The control: the same request within the deadline is served.
    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    // Deliberate: each stage takes a third of the deadline, together within it.
    tokio::time::sleep(timeout.mul_f64(0.3)).await;
    conn.write(&request[..1]).await.unwrap();
    tokio::time::sleep(timeout.mul_f64(0.3)).await;
    conn.write(&request[1..]).await.unwrap();
    assert_eq!(conn.read_response().await.unwrap().status, 200);
}

// ------------------------------------------------------------------------- connection budget

const LIMIT_METRIC: &str = "kms_tag_guard_connection_limit_total";

/// An Encrypt on `conn`, answered 200.
async fn encrypt_on(conn: &mut RawConn, fake: &FakeKms) {
    let request = RawRequest::signed_kms(&fake.host(), ENCRYPT, encrypt_body().as_bytes());
    conn.write(&request.to_bytes()).await.unwrap();
    let response = conn.read_response().await.unwrap();
    assert_eq!(response.status, 200, "{}", response.body_str());
}

/// At `max_connections`, the connection idle the longest is closed to make room (a kept-alive
/// one after its answer, or one that has said nothing since accept), and one with a request in
/// flight never is: its answer arrives.
#[tokio::test]
async fn at_the_limit_the_oldest_idle_connection_makes_room() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            admin: true,
            limits: "max_connections = 4\nheader_read_timeout_ms = 30000".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let admin = proxy.admin_addr.unwrap();
    // Deliberate pauses between the connections, so that their idle ages differ.
    let step = Duration::from_millis(30);
    // a: idle since its answer; c: silent since accept; d: idle since its answer, last.
    let mut a = RawConn::connect(proxy.addr).await.unwrap();
    encrypt_on(&mut a, &fake).await;
    tokio::time::sleep(step).await;
    let mut c = RawConn::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(step).await;
    let mut d = RawConn::connect(proxy.addr).await.unwrap();
    encrypt_on(&mut d, &fake).await;
    // b: a request in flight, the oldest connection of all by then.
    fake.set_delay(Duration::from_secs(2));
    let mut b = RawConn::connect(proxy.addr).await.unwrap();
    let slow = RawRequest::signed_kms(&fake.host(), ENCRYPT, encrypt_body().as_bytes());
    b.write(&slow.to_bytes()).await.unwrap();
    fake.wait_for_requests(3, STEP_WAIT).await;

    let mut newcomers = Vec::new();
    for (evicted, name) in [(&mut a, "a"), (&mut c, "c"), (&mut d, "d")] {
        newcomers.push(RawConn::connect(proxy.addr).await.unwrap());
        assert!(
            evicted.is_closed_within(MARGIN).await,
            "{name} should have been closed to make room"
        );
    }
    let m = common::ops::scrape(admin).await;
    assert_eq!(m.count(LIMIT_METRIC, &[("action", "evicted")]), 3.0);
    assert_eq!(m.count(LIMIT_METRIC, &[("action", "refused")]), 0.0);
    assert!(m.count("kms_tag_guard_connections_open", &[]) <= 4.0);
    let answer = b.read_response().await.unwrap();
    assert_eq!(answer.status, 200, "the request in flight completes");
    fake.set_delay(Duration::ZERO);
    // The newest connections were kept: the last one to arrive is served.
    let mut newest = newcomers.pop().unwrap();
    encrypt_on(&mut newest, &fake).await;
}

const STEP_WAIT: Duration = Duration::from_secs(5);

/// When every connection has a request in flight, a new one is closed at once (and counted);
/// the requests in flight are answered.
#[tokio::test]
async fn at_the_limit_with_every_connection_busy_a_new_one_is_refused() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            admin: true,
            limits: "max_connections = 2".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    fake.set_delay(Duration::from_secs(2));
    let request = RawRequest::signed_kms(&fake.host(), ENCRYPT, encrypt_body().as_bytes());
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut conn = RawConn::connect(proxy.addr).await.unwrap();
        conn.write(&request.to_bytes()).await.unwrap();
        busy.push(conn);
    }
    fake.wait_for_requests(2, STEP_WAIT).await;
    let refused = raw::try_send(proxy.addr, &request.to_bytes()).await;
    assert!(refused.is_err(), "{:?}", refused.map(|r| r.status));
    for conn in &mut busy {
        assert_eq!(conn.read_response().await.unwrap().status, 200);
    }
    assert_eq!(fake.count(), 2, "the refused request reached nobody");
    let m = common::ops::scrape(proxy.admin_addr.unwrap()).await;
    assert_eq!(m.count(LIMIT_METRIC, &[("action", "refused")]), 1.0);
}

/// The real binary under `ulimit -S -n 256`: it raises its soft limit to the hard one and logs
/// both.
#[tokio::test]
async fn the_soft_descriptor_limit_is_raised_to_the_hard_limit() {
    let hard = child::nofile_limits(std::process::id()).map_or(0, |(_, hard)| hard);
    if hard <= 256 {
        eprintln!("SKIPPED the_soft_descriptor_limit_is_raised_to_the_hard_limit: the hard limit here is {hard}");
        return;
    }
    let mut opts = ChildOptions::new("http://127.0.0.1:9");
    opts.soft_nofile = Some(256);
    let proxy = start_child(opts).await;
    let log = proxy.stderr();
    let limits = child::nofile_limits(proxy.pid);
    drop(proxy);
    let (soft, hard) = limits.expect("/proc/<pid>/limits");
    assert_eq!(soft, hard, "the soft limit is raised to the hard one");
    let line = log
        .lines()
        .find(|l| l.contains("file descriptor limit"))
        .unwrap_or_else(|| panic!("no log line about the limit:\n{log}"));
    assert!(
        line.contains("soft_before=256") && line.contains(&format!("soft={hard}")),
        "{line}"
    );
}

/// The issue's case: under a descriptor limit of 1,024, 1,100 connections that never finish
/// their set-up used to exhaust the descriptors, `accept` failed with EMFILE, and a real client
/// waited until the idle timeout freed some. Now the budget (lowered to fit the limit) closes
/// the oldest of them for each newcomer, and the real client is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_cannot_exhaust_the_descriptors() {
    let own = child::raise_own_nofile(4096);
    assert!(own >= 2048, "the test process may open only {own} files");
    let fake = FakeKms::start().await;
    let mut opts = ChildOptions::new(&fake.url());
    // Far longer than the test: without the budget, nothing would free a descriptor.
    opts.config.limits = "header_read_timeout_ms = 60000".into();
    opts.nofile = Some(1024);
    let proxy = start_child(opts).await;
    assert_eq!(proxy.nofile_limit(), Some(1024));
    let addr = proxy.addr;
    let mut silent = Vec::new();
    while silent.len() < 1100 {
        let mut batch = JoinSet::new();
        for _ in 0..100 {
            batch.spawn(async move { TcpStream::connect(addr).await });
        }
        while let Some(joined) = batch.join_next().await {
            if let Ok(Ok(stream)) = joined {
                silent.push(stream);
            }
        }
    }
    assert!(
        proxy.open_fds() < 1024,
        "{} descriptors open",
        proxy.open_fds()
    );
    assert_served("after 1,100 half-open connections", &fake, addr).await;
    let log = proxy.stderr();
    assert!(log.contains("connection limit reached"), "{log}");
    assert!(
        !log.contains("accept failed"),
        "accept ran out of descriptors:\n{log}"
    );
    drop(silent);
}

// ------------------------------------------------------------------------- evicted, whatever the client does

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A header block of literal fields without indexing, new names, no Huffman (all under 127
/// bytes).
fn hpack_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        for s in [name, value] {
            assert!(s.len() < 127);
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

/// An HTTP/2 connection by hand that makes one request, reads its answer, and from then on
/// never reads again: it acknowledges nothing, the PING that follows GOAWAY included.
async fn frozen_h2_connection(proxy: SocketAddr, fake: &FakeKms) -> RawConn {
    let mut conn = RawConn::connect(proxy).await.unwrap();
    let host = fake.host();
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(h2_frame(0x4, 0, 0, &[])); // SETTINGS
    bytes.extend(h2_frame(0x4, 0x1, 0, &[])); // SETTINGS ACK (of the server's, sent blind)
    let block = hpack_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", &host),
        ("content-type", "application/x-amz-json-1.1"),
        ("x-amz-target", ENCRYPT),
    ]);
    bytes.extend(h2_frame(0x1, 0x1 | 0x4, 1, &block)); // HEADERS, END_STREAM | END_HEADERS
    conn.write(&bytes).await.unwrap();
    // The answer (a refusal: the request is not signed): read until the proxy goes quiet.
    let mut buf = [0u8; 4096];
    let mut got = 0;
    loop {
        match tokio::time::timeout(Duration::from_millis(300), conn.stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => panic!("the proxy closed the h2 connection"),
            Ok(Ok(n)) => got += n,
            Err(_) if got > 0 => break,
            Err(_) => panic!("no answer on the h2 connection"),
        }
    }
    conn
}

/// Point 3: a connection evicted for room is closed within a short deadline even when its client
/// never answers the PING after GOAWAY (before: it stayed open a whole idle period, while new
/// connections were refused).
#[tokio::test]
async fn an_evicted_connection_is_closed_even_if_its_client_never_answers() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            admin: true,
            limits: "max_connections = 1\nheader_read_timeout_ms = 30000\nidle_timeout_ms = 60000"
                .into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let mut frozen = frozen_h2_connection(proxy.addr, &fake).await;
    // A newcomer takes its place: the frozen connection is asked to close, then closed.
    let mut newcomer = RawConn::connect(proxy.addr).await.unwrap();
    let asked = Instant::now();
    let closed = frozen
        .is_closed_within(Duration::from_secs(1) + MARGIN)
        .await;
    assert!(
        closed,
        "the evicted connection is still open {} ms after the eviction (idle_timeout_ms = 60000)",
        ms(asked.elapsed())
    );
    eprintln!(
        "evicted connection closed within {} ms",
        ms(asked.elapsed())
    );
    encrypt_on(&mut newcomer, &fake).await;
    let m = common::ops::scrape(proxy.admin_addr.unwrap()).await;
    assert_eq!(m.count(LIMIT_METRIC, &[("action", "evicted")]), 1.0);
}

/// At shutdown, an idle HTTP/2 connection whose client never answers is closed after a short
/// deadline, so the drain does not wait the whole grace period for it.
#[tokio::test]
async fn shutdown_does_not_wait_the_grace_period_for_a_client_that_never_answers() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            limits: "idle_timeout_ms = 60000".into(),
            shutdown: "drain_delay_ms = 0\ngrace_ms = 20000".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let mut frozen = frozen_h2_connection(proxy.addr, &fake).await;
    let started = Instant::now();
    proxy.proxy.shutdown();
    let stopped = tokio::time::timeout(Duration::from_secs(1) + MARGIN, proxy.proxy.wait()).await;
    assert!(
        stopped.is_ok(),
        "the drain still waits {} ms after SIGTERM for a client that never answers (grace_ms = 20000)",
        ms(started.elapsed())
    );
    assert!(frozen.is_closed_within(MARGIN).await);
}
