//! One memory formula, enforced (docs/security.md, "Bounded memory"): the terms a client can
//! grow are bounded by the settings. A tag change whose body does not fit in the global budget
//! of bodies held (`[limits].max_buffered_body_bytes`) is refused with 503 on both serving paths
//! while requests streamed through pass; an HTTP/2 connection is offered
//! `[limits].max_concurrent_streams` streams; and the real binary, under a real memory limit
//! computed from the formula, survives the hostile loads of issue 18 (HTTP/2 connections
//! opening every stream they may with large tag changes, many idle HTTP/1.1 connections after a
//! large body each) with Encrypt served during and after.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::child::{self, start_child, ChildOptions, ChildProxy};
use common::ops::try_admin_get;
use common::raw::{self, RawConn, RawRequest};
use common::sentinel::assert_nothing_forwarded;
use common::*;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
const TAG_RESOURCE: &str = "TrentService.TagResource";
const ENCRYPT: &str = "TrentService.Encrypt";

/// An allowed TagResource body of exactly `len` bytes (JSON padded with trailing spaces).
fn tag_body(len: usize) -> Vec<u8> {
    let mut body =
        format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:owner","TagValue":"payments"}}]}}"#)
            .into_bytes();
    assert!(body.len() <= len);
    body.resize(len, b' ');
    body
}

fn encrypt_body() -> Vec<u8> {
    format!(r#"{{"KeyId":"{KEY}","Plaintext":"aGVsbG8="}}"#).into_bytes()
}

/// The value of an unlabelled metric.
async fn metric(admin: SocketAddr, name: &str) -> Option<i64> {
    let text = try_admin_get(admin, "/metrics").await.ok()?.body_str();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Waits (up to 5 s) until the metric `name` is `value`.
async fn wait_for_metric(admin: SocketAddr, name: &str, value: i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = metric(admin, name).await;
        if now == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {now:?}, not {value}, after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP/2 connection (prior knowledge, plain TCP) to the proxy.
async fn h2_connect(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<common_body::Body> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

mod common_body {
    /// A request body for the HTTP/2 client: whole, or sent in pieces through a channel.
    pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;
}

/// A signed KMS request for the HTTP/2 client (signed over `host`; the proxy forwards it as
/// HTTP/1.1) whose body is `body`, declared `declared` bytes long.
fn h2_request(
    host: &str,
    target: &str,
    signed_body: &[u8],
    body: common_body::Body,
) -> http::Request<common_body::Body> {
    let signed = sigv4::sign(
        "POST",
        host,
        target,
        signed_body,
        ACCESS_KEY_ID,
        SECRET_KEY,
        REGION,
        None,
    );
    http::Request::post(format!("http://{host}/"))
        .header("content-type", "application/x-amz-json-1.1")
        .header("content-length", signed_body.len())
        .header("x-amz-target", target)
        .header("x-amz-date", &signed.amz_date)
        .header("authorization", &signed.authorization)
        .body(body)
        .unwrap()
}

fn whole(body: &[u8]) -> common_body::Body {
    Full::new(Bytes::copy_from_slice(body)).boxed()
}

/// The refusal of a tag change past the body budget: 503, KMS-shaped, naming the setting.
fn assert_budget_refusal(case: &str, status: u16, kind: Option<&str>, body: &[u8]) {
    let json: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{case}: not JSON ({e}): {}", String::from_utf8_lossy(body)));
    assert_eq!(status, 503, "{case}: {json}");
    assert_eq!(json["__type"], "ServiceUnavailable", "{case}: {json}");
    assert_eq!(kind, Some("body-budget"), "{case}");
    assert!(
        json["message"]
            .as_str()
            .is_some_and(|m| m.contains("[limits].max_buffered_body_bytes")),
        "{case}: {json}"
    );
}

// ------------------------------------------------------------------------------ the body budget

/// One connection holds most of the budget (its head declares 4,096 bytes, its body is
/// withheld): a tag change of 3,000 bytes no longer fits, on the fast path, on the general
/// server (chunked, reserved as it grows) and over HTTP/2 (reserved by its Content-Length), and
/// gets 503, audited as a deny, never forwarded; an Encrypt passes meanwhile. Once the holder's
/// body has come and gone, the same tag change passes.
#[tokio::test]
async fn a_tag_change_past_the_body_budget_gets_503_while_encrypt_passes() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            limits: "max_body_bytes = 4096\nmax_buffered_body_bytes = 6144".into(),
            admin: true,
            ..ProxyConfig::default()
        },
    )
    .await;
    let admin = proxy.admin_addr.expect("admin port");
    let host = fake.host();

    let held = RawRequest::signed_kms(&host, TAG_RESOURCE, &tag_body(4096));
    let mut holder = RawConn::connect(proxy.addr).await.unwrap();
    holder.write(&held.head_bytes()).await.unwrap();
    holder.write(&held.body[..100]).await.unwrap();
    wait_for_metric(admin, "kms_tag_guard_buffered_body_bytes", 4096).await;

    let over = RawRequest::signed_kms(&host, TAG_RESOURCE, &tag_body(3000));
    let fast = raw::send(proxy.addr, &over.to_bytes()).await;
    assert_budget_refusal(
        "fast path",
        fast.status,
        fast.header("x-kms-tag-guard"),
        &fast.body,
    );

    let mut chunked = over.clone();
    chunked.remove_header("Content-Length");
    chunked.add_header("Transfer-Encoding", "chunked");
    let mut bytes = chunked.head_bytes();
    bytes.extend_from_slice(format!("{:x}\r\n", over.body.len()).as_bytes());
    bytes.extend_from_slice(&over.body);
    bytes.extend_from_slice(b"\r\n0\r\n\r\n");
    let general = raw::send(proxy.addr, &bytes).await;
    assert_budget_refusal(
        "general server, chunked",
        general.status,
        general.header("x-kms-tag-guard"),
        &general.body,
    );

    let mut h2 = h2_connect(proxy.addr).await;
    let response = h2
        .send_request(h2_request(
            &host,
            TAG_RESOURCE,
            &over.body,
            whole(&over.body),
        ))
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let kind = parts
        .headers
        .get("x-kms-tag-guard")
        .map(|v| v.to_str().unwrap());
    assert_budget_refusal("HTTP/2", parts.status.as_u16(), kind, &body);

    // Nothing of the three reached KMS; an Encrypt (the sentinel) passes.
    assert_nothing_forwarded("tag changes past the body budget", &fake, proxy.addr).await;
    let encrypt = RawRequest::signed_kms(&host, ENCRYPT, &encrypt_body());
    assert_eq!(raw::send(proxy.addr, &encrypt.to_bytes()).await.status, 200);

    let denied: Vec<Value> = proxy
        .wait_for_audit(3)
        .await
        .into_iter()
        .filter(|r| r["event"] == "decision" && r["decision"] == "deny")
        .collect();
    assert_eq!(denied.len(), 3, "{denied:#?}");
    for record in &denied {
        assert_eq!(record["operation"], "TagResource", "{record}");
        assert!(
            record.to_string().contains("max_buffered_body_bytes"),
            "{record}"
        );
    }
    assert_eq!(
        metric(admin, "kms_tag_guard_body_budget_refusals_total").await,
        Some(3)
    );

    // The holder's body arrives; the change is forwarded and its bytes given back.
    holder.write(&held.body[100..]).await.unwrap();
    assert_eq!(holder.read_response().await.unwrap().status, 200);
    wait_for_metric(admin, "kms_tag_guard_buffered_body_bytes", 0).await;
    let again = raw::send(proxy.addr, &over.to_bytes()).await;
    assert_eq!(again.status, 200, "{}", again.body_str());
    let over_h2 = h2
        .send_request(h2_request(
            &host,
            TAG_RESOURCE,
            &over.body,
            whole(&over.body),
        ))
        .await
        .unwrap();
    assert_eq!(over_h2.status(), 200);
    let _ = over_h2.into_body().collect().await;
    wait_for_metric(admin, "kms_tag_guard_buffered_body_bytes", 0).await;
}

// ----------------------------------------------------------------------------- HTTP/2 streams

/// What the proxy's SETTINGS frame offers a client: `SETTINGS_MAX_CONCURRENT_STREAMS` as the h2
/// client reads it.
async fn advertised_streams(addr: SocketAddr) -> usize {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (_client, mut connection) = h2::client::handshake(stream).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Driving the connection reads the server's SETTINGS.
        tokio::select! {
            _ = &mut connection => panic!("the proxy closed the HTTP/2 connection"),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        let max = connection.max_concurrent_send_streams();
        if max != usize::MAX || Instant::now() > deadline {
            return max;
        }
    }
}

/// hyper's server offers 200 streams per connection unless told otherwise; each may hold a tag
/// change's body, so the proxy offers `max_concurrent_streams` (16 by default).
#[tokio::test]
async fn an_http2_connection_is_offered_max_concurrent_streams() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    assert_eq!(advertised_streams(proxy.addr).await, 16);

    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            limits: "max_concurrent_streams = 3".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    assert_eq!(advertised_streams(proxy.addr).await, 3);
}

/// A client that ignores the SETTINGS and opens one stream more than offered has it refused
/// (`REFUSED_STREAM`), never served: the h2 client is told the server offers more than it does
/// (its own limit is not the check), and the fourth of four Encrypts whose bodies are withheld
/// fails while the first three are answered once their bodies come.
#[tokio::test]
async fn a_stream_past_max_concurrent_streams_is_refused() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            limits: "max_concurrent_streams = 3".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let host = fake.host();
    let body = encrypt_body();
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_max_send_streams(100)
        .handshake::<_, Bytes>(stream)
        .await
        .unwrap();
    // The client's own limit must not be what stops the fourth stream: open them all before the
    // server's SETTINGS are read.
    let mut client = client;
    let mut sends = Vec::new();
    for _ in 0..4 {
        let request = h2_request(&host, ENCRYPT, &body, whole(&body)).map(|_| ());
        let (response, send) = client.send_request(request, false).unwrap();
        sends.push((response, send));
    }
    tokio::spawn(connection);
    let mut answered = 0;
    let mut refused = 0;
    for (response, mut send) in sends {
        let _ = send.send_data(Bytes::from(body.clone()), true);
        match tokio::time::timeout(Duration::from_secs(10), response).await {
            Ok(Ok(response)) if response.status() == 200 => answered += 1,
            Ok(Err(error)) if error.reason() == Some(h2::Reason::REFUSED_STREAM) => refused += 1,
            other => panic!("unexpected answer: {other:?}"),
        }
    }
    assert_eq!((answered, refused), (3, 1));
    // The refused stream reached nobody: KMS got the three answered, and nothing after them.
    let encrypts = fake
        .requests()
        .iter()
        .filter(|r| r.body[..] == body[..])
        .count();
    assert_eq!(encrypts, 3);
    fake.clear();
    assert_nothing_forwarded("a stream past the limit", &fake, proxy.addr).await;
}

// ------------------------------------------------------------------- idle connections' buffers

/// 300 HTTP/1.1 connections each send a whole tag change of `max_body_bytes` (256 KiB) and stay
/// open: each keeps a small read buffer, not the one that held its body (before: 281 KiB each,
/// 1,000 of them 268 MiB). The real binary, so that its resident memory is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_after_a_large_body_keep_a_small_buffer() {
    const CONNECTIONS: u64 = 300;
    child::raise_own_nofile(4096);
    let fake = FakeKms::start().await;
    let host = fake.host();
    let mut opts = ChildOptions::new(&fake.url());
    opts.nofile = Some(4096);
    let proxy = start_child(opts).await;
    let before = settled_rss_kib(&proxy).await;
    let large = RawRequest::signed_kms(&host, TAG_RESOURCE, &tag_body(262_144)).to_bytes();
    let mut idle = Vec::new();
    for _ in 0..CONNECTIONS / 50 {
        let mut batch = JoinSet::new();
        for _ in 0..50 {
            batch.spawn(idle_after_large_body(proxy.addr, large.clone()));
        }
        while let Some(conn) = batch.join_next().await {
            idle.push(conn.unwrap());
        }
    }
    let with = settled_rss_kib(&proxy).await;
    let each = with.saturating_sub(before) / CONNECTIONS;
    eprintln!(
        "RSS {before} KiB -> {with} KiB with {CONNECTIONS} idle connections: {each} KiB each"
    );
    assert!(
        each < 100,
        "an idle connection after a 256 KiB tag change keeps {each} KiB"
    );
    encrypt_passes("after the large bodies", proxy.addr, &host).await;
    drop(idle);
}

// ------------------------------------------------------------------ under a real memory limit

/// A memory cgroup made for one process (v2 `memory.max`, or v1 `memory.limit_in_bytes`),
/// nested under the test's own; removed when dropped (its process killed first).
struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    /// `None` (and why) where no memory cgroup can be made.
    fn create(limit: u64) -> Result<MemoryCgroup, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let name = format!("kms-tag-guard-memory-test-{}", std::process::id());
        // cgroup v2: the unified hierarchy, with the memory controller enabled for children.
        if let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) {
            let parent = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
            let enabled =
                std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
            if enabled.split_whitespace().any(|c| c == "memory") {
                let dir = parent.join(&name);
                if std::fs::create_dir(&dir).is_ok() {
                    let group = MemoryCgroup { dir, v2: true };
                    group.write("memory.max", &limit.to_string())?;
                    let _ = group.write("memory.swap.max", "0");
                    return Ok(group);
                }
            }
        }
        let path = own
            .lines()
            .find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers
                    .split(',')
                    .any(|c| c == "memory")
                    .then(|| path.to_owned())
            })
            .ok_or("no memory controller in /proc/self/cgroup")?;
        let parent = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
        let dir = parent.join(&name);
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let group = MemoryCgroup { dir, v2: false };
        group.write("memory.limit_in_bytes", &limit.to_string())?;
        // Where swap is accounted, none either.
        let _ = group.write("memory.memsw.limit_in_bytes", &limit.to_string());
        Ok(group)
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        std::fs::write(self.dir.join(file), value)
            .map_err(|e| format!("cannot write {value} to {}/{file}: {e}", self.dir.display()))
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// Its `cgroup.procs`, for a child to join.
    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// How many processes the kernel killed for memory in this cgroup.
    fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        self.read(file)
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The most memory charged to it at once.
    fn peak_bytes(&self) -> Option<u64> {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        self.read(file).trim().parse().ok()
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for pid in self.read("cgroup.procs").split_whitespace() {
            child::send_signal(pid.parse().unwrap_or(0), "KILL");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The settings of the guard under test and what the formula of docs/security.md makes of
/// them (its figures, as measured and documented there).
struct Sizing {
    max_connections: u64,
    max_concurrent_streams: u64,
    max_buffered_body_bytes: u64,
    /// `[audit] queue_max_bytes`.
    audit_queue_bytes: u64,
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
/// The formula's figures (docs/security.md, "Bounded memory").
const BASE: u64 = 16 * MIB;
const PER_CONNECTION: u64 = 128 * KIB;
const PER_STREAM: u64 = 80 * KIB;
/// What the admin port may hold (its term of the formula): 32 connections × 64 KiB.
const ADMIN: u64 = 2 * MIB;
/// Log lines waiting for standard error.
const LOGS: u64 = MIB;

impl Sizing {
    /// base + connections × per connection + connections × streams × per stream + the body
    /// budget + the audit queue in bytes + the admin port + the log queue; no leaf cache (no
    /// interception).
    fn limit(&self) -> u64 {
        BASE + self.max_connections * PER_CONNECTION
            + self.max_connections * self.max_concurrent_streams * PER_STREAM
            + self.max_buffered_body_bytes
            + self.audit_queue_bytes
            + ADMIN
            + LOGS
    }
}

/// Fails the test if the guard was killed for memory or is gone.
fn assert_alive(case: &str, cgroup: &MemoryCgroup, proxy: &mut ChildProxy) {
    let kills = cgroup.oom_kills();
    assert_eq!(
        kills,
        0,
        "{case}: the guard was killed for memory (cgroup peak {} MiB)",
        cgroup.peak_bytes().unwrap_or(0) / MIB
    );
    assert!(
        !proxy.has_exited(),
        "{case}: the guard is gone: {}",
        proxy.stderr()
    );
}

/// Sends an Encrypt through the proxy on a fresh connection.
async fn encrypt_passes(case: &str, addr: SocketAddr, host: &str) {
    let request = RawRequest::signed_kms(host, ENCRYPT, &encrypt_body());
    match raw::try_send(addr, &request.to_bytes()).await {
        Ok(response) if response.status == 200 => {}
        Ok(response) => panic!(
            "{case}: Encrypt answered {}: {}",
            response.status,
            response.body_str()
        ),
        Err(e) => panic!("{case}: Encrypt failed: {e}"),
    }
}

/// A connection that has sent a whole allowed tag change of `max_body_bytes` and had its
/// answer, then stays open and idle. Refused with 503 while the body budget is full (many of
/// them at once), it retries on the same connection, as an SDK would.
async fn idle_after_large_body(addr: SocketAddr, request: Vec<u8>) -> RawConn {
    let mut conn = RawConn::connect(addr).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        conn.write(&request).await.unwrap();
        let response = conn.read_response().await.unwrap();
        match response.status {
            200 => return conn,
            503 if Instant::now() < deadline => {
                assert_eq!(response.header("x-kms-tag-guard"), Some("body-budget"));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            status => panic!(
                "a large tag change answered {status}: {}",
                response.body_str()
            ),
        }
    }
}

/// A request body sent in pieces through a channel, never ended while the sender lives.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|piece| piece.map(|bytes| Ok(http_body::Frame::data(bytes))))
    }
}

/// An HTTP/2 connection that opens `streams` tag changes of `len` bytes (more than the proxy
/// offers: the client queues the rest) and sends all but the last byte of each (`withhold`:
/// none of it), so that each stream holds as much as it can; they stay open until `hold` ends.
async fn h2_hog(
    addr: SocketAddr,
    host: String,
    streams: usize,
    len: usize,
    withhold: bool,
    hold: tokio::sync::watch::Receiver<bool>,
) {
    let mut sender = h2_connect(addr).await;
    let body = tag_body(len);
    // Signed once (hashing 256 KiB per stream would starve the test's own runtime).
    let template = h2_request(&host, TAG_RESOURCE, &body, whole(b""));
    let piece = Bytes::copy_from_slice(&body[..len - 1]);
    let mut open = JoinSet::new();
    for _ in 0..streams {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        if !withhold {
            tx.try_send(piece.clone()).unwrap();
        }
        let mut request = http::Request::new(ChannelBody(rx).boxed());
        *request.method_mut() = template.method().clone();
        *request.uri_mut() = template.uri().clone();
        *request.headers_mut() = template.headers().clone();
        let sent = sender.send_request(request);
        let mut hold = hold.clone();
        open.spawn(async move {
            let _tx = tx;
            tokio::select! {
                _ = sent => {}
                _ = hold.wait_for(|done| *done) => {}
            }
        });
    }
    while open.join_next().await.is_some() {}
}

/// The proxy's resident memory, in KiB.
fn rss_kib(proxy: &ChildProxy) -> u64 {
    proxy.rss_kib().expect("the proxy's VmRSS")
}

/// Waits until the proxy's resident memory stops growing (two reads 300 ms apart within 1%),
/// up to 10 s; returns it in KiB.
async fn settled_rss_kib(proxy: &ChildProxy) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = rss_kib(proxy);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = rss_kib(proxy);
        if now.abs_diff(last) * 100 <= last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

fn hostile_config(fake: &FakeKms, sizing: &Sizing) -> ChildOptions {
    let mut opts = ChildOptions::with_config(ProxyConfig {
        endpoint: Some(fake.url()),
        limits: format!(
            "max_connections = {}\nmax_concurrent_streams = {}\nmax_buffered_body_bytes = {}\n\
             body_read_timeout_ms = 60000\nidle_timeout_ms = 300000",
            sizing.max_connections, sizing.max_concurrent_streams, sizing.max_buffered_body_bytes
        ),
        audit: format!(
            "fail_closed = true\nqueue_max_bytes = {}",
            sizing.audit_queue_bytes
        ),
        admin: true,
        shutdown: "grace_ms = 2000".into(),
        ..ProxyConfig::default()
    });
    opts.nofile = Some(8192);
    opts
}

/// The guard as an operator runs it: the real binary in a memory cgroup whose limit is the
/// formula's figure for its settings. Against it, 500 HTTP/1.1 connections each send a whole
/// tag change of `max_body_bytes` (256 KiB) and then stay idle (before: 281 KiB kept by each),
/// then 16 HTTP/2 connections each try 64 tag changes of 256 KiB at once, two in three of them
/// sending all but the last byte of each body, the others withholding the bodies (before: every
/// stream's body held, 200 streams per connection). It is never killed for memory, Encrypt passes during and after
/// the load, and the peak stays under the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_survives_hostile_loads_under_a_memory_limit() {
    let sizing = Sizing {
        max_connections: 600,
        max_concurrent_streams: 4,
        max_buffered_body_bytes: 8 * MIB,
        audit_queue_bytes: MIB,
    };
    let limit = sizing.limit();
    let cgroup = match MemoryCgroup::create(limit) {
        Ok(cgroup) => cgroup,
        Err(why) => {
            eprintln!("SKIPPED: no memory cgroup could be made and limited here ({why})");
            return;
        }
    };
    child::raise_own_nofile(4096);
    let fake = FakeKms::start().await;
    let host = fake.host();
    let mut opts = hostile_config(&fake, &sizing);
    opts.cgroup_procs = Some(cgroup.procs());
    let mut proxy = start_child(opts).await;
    let before = rss_kib(&proxy);

    // 500 idle HTTP/1.1 connections after one large tag change each.
    let large = RawRequest::signed_kms(&host, TAG_RESOURCE, &tag_body(262_144)).to_bytes();
    let mut idle = Vec::new();
    for _ in 0..10 {
        let mut batch = JoinSet::new();
        for _ in 0..50 {
            batch.spawn(idle_after_large_body(proxy.addr, large.clone()));
        }
        while let Some(conn) = batch.join_next().await {
            idle.push(conn.unwrap());
        }
        assert_alive("during the idle connections", &cgroup, &mut proxy);
        encrypt_passes("during the idle connections", proxy.addr, &host).await;
    }
    let with_idle = settled_rss_kib(&proxy).await;

    // 16 HTTP/2 connections opening every stream they may with large tag changes.
    let (release, hold) = tokio::sync::watch::channel(false);
    let mut hogs = JoinSet::new();
    for n in 0..16 {
        hogs.spawn(h2_hog(
            proxy.addr,
            host.clone(),
            64,
            262_144,
            n % 3 == 2,
            hold.clone(),
        ));
    }
    // While they hold what they can: the budget is full, Encrypt passes.
    let admin = proxy.admin();
    // They fill the body budget (32 reservations of 256 KiB) and are refused past it.
    let full = sizing.max_buffered_body_bytes as i64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(admin, "kms_tag_guard_buffered_body_bytes").await < Some(full) {
        assert_alive("under the HTTP/2 load", &cgroup, &mut proxy);
        assert!(Instant::now() < deadline, "the body budget never filled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_alive("under the HTTP/2 load", &cgroup, &mut proxy);
    encrypt_passes(
        "while HTTP/2 connections hold the body budget",
        proxy.addr,
        &host,
    )
    .await;
    let with_h2 = settled_rss_kib(&proxy).await;
    encrypt_passes("under the whole load", proxy.addr, &host).await;
    let buffered = metric(admin, "kms_tag_guard_buffered_body_bytes")
        .await
        .unwrap();
    release.send(true).unwrap();
    while hogs.join_next().await.is_some() {}
    drop(idle);
    encrypt_passes("after the load", proxy.addr, &host).await;

    let peak = cgroup.peak_bytes().unwrap_or(0);
    eprintln!(
        "memory limit {} MiB (formula); RSS before {before} KiB, with 500 idle connections after \
         a 256 KiB body {with_idle} KiB ({} KiB each), with the HTTP/2 load too {with_h2} KiB; \
         bodies held {buffered} bytes; cgroup peak {} MiB",
        limit / MIB,
        with_idle.saturating_sub(before) / 500,
        peak / MIB
    );
    assert_alive("after the load", &cgroup, &mut proxy);
    assert!(
        buffered <= sizing.max_buffered_body_bytes as i64,
        "{buffered} bytes of bodies held"
    );
    assert!(
        (with_idle.saturating_sub(before)) / 500 < 100,
        "an idle connection after a large body keeps {} KiB",
        with_idle.saturating_sub(before) / 500
    );
}

// ------------------------------------------------------------------- the formula's figures

/// A fresh guard for one measurement, in front of `fake` (with `upstream`: its `ca_file`).
async fn measured_guard(fake: &FakeKms, upstream: &str) -> ChildProxy {
    let mut opts = ChildOptions::with_config(ProxyConfig {
        endpoint: Some(fake.url()),
        upstream: upstream.to_owned(),
        limits: "max_connections = 4000\nbody_read_timeout_ms = 120000\n\
                 idle_timeout_ms = 300000\nheader_read_timeout_ms = 120000"
            .into(),
        audit_path: None,
        shutdown: "grace_ms = 1000".into(),
        ..ProxyConfig::default()
    });
    opts.nofile = Some(16384);
    start_child(opts).await
}

/// Per-connection (or per-stream) resident memory of `load`, in KiB: the settled RSS with what
/// it holds open, less the settled RSS before, over `count`.
async fn measure<F, Fut, T>(
    (fake, upstream): (&FakeKms, &str),
    what: &str,
    count: usize,
    load: F,
) -> u64
where
    F: FnOnce(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let proxy = measured_guard(fake, upstream).await;
    let before = settled_rss_kib(&proxy).await;
    let held = load(proxy.addr).await;
    let with = settled_rss_kib(&proxy).await;
    let each = with.saturating_sub(before) * 1024 / count as u64;
    eprintln!(
        "FIGURE {}{what}: RSS {before} KiB -> {with} KiB with {count}: {} bytes ({} KiB) each",
        if upstream.is_empty() {
            ""
        } else {
            "(TLS to KMS) "
        },
        each,
        each / 1024
    );
    drop(held);
    each
}

/// Opens `n` connections with `per`, 50 at a time.
async fn open_many<F, Fut, T>(n: usize, per: F) -> Vec<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mut batch = JoinSet::new();
        for _ in 0..(n - out.len()).min(50) {
            batch.spawn(per());
        }
        while let Some(one) = batch.join_next().await {
            out.push(one.unwrap());
        }
    }
    out
}

/// An HTTP/2 connection with `streams` Encrypts whose bodies stop one byte short (each stream's
/// request is forwarded, its head with `pad` bytes of an extra header), held until dropped.
async fn h2_streams_open(
    addr: SocketAddr,
    host: String,
    streams: usize,
    pad: usize,
) -> (
    hyper::client::conn::http2::SendRequest<common_body::Body>,
    Vec<tokio::sync::mpsc::Sender<Bytes>>,
) {
    let mut sender = h2_connect(addr).await;
    let body = encrypt_body();
    let template = h2_request(&host, ENCRYPT, &body, whole(b""));
    let mut held = Vec::new();
    for _ in 0..streams {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        tx.try_send(Bytes::copy_from_slice(&body[..body.len() - 1]))
            .unwrap();
        let mut request = http::Request::new(ChannelBody(rx).boxed());
        *request.method_mut() = template.method().clone();
        *request.uri_mut() = template.uri().clone();
        *request.headers_mut() = template.headers().clone();
        if pad > 0 {
            request
                .headers_mut()
                .insert("x-pad", "a".repeat(pad).parse().unwrap());
        }
        sender.ready().await.unwrap();
        drop(tokio::spawn(sender.send_request(request)));
        held.push(tx);
    }
    (sender, held)
}

/// A fake KMS behind TLS for `localhost` (HTTP/1.1 only), and the `[upstream]` line that
/// makes the guard trust it.
async fn tls_fake(dir: &Path) -> (FakeKms, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "memory test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(
        leaf_key.serialize_der(),
    ));
    let fake = FakeKms::start_tls(vec![leaf.der().clone()], key, vec![b"http/1.1".to_vec()]).await;
    (fake, format!("ca_file = \"{}\"", ca_file.display()))
}

/// The per-connection and per-stream figures of docs/security.md's memory formula, measured on
/// the binary `KMS_TAG_GUARD_BIN` names (the release build for the docs), with a plain-HTTP and
/// a TLS upstream:
///
/// ```text
/// cargo build --release
/// KMS_TAG_GUARD_BIN=target/release/kms-tag-guard \
///   cargo test --test memory -- --ignored --nocapture the_formula
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints figures; run by hand with the release binary"]
async fn the_formula_figures() {
    child::raise_own_nofile(16384);
    let dir = tempfile::tempdir().unwrap();
    let plain = FakeKms::start().await;
    let (tls, ca_line) = tls_fake(dir.path()).await;
    for (fake, upstream) in [(&plain, ""), (&tls, ca_line.as_str())] {
        formula_figures(fake, upstream).await;
    }
}

async fn formula_figures(fake: &FakeKms, upstream: &str) {
    let host = fake.host();
    let at = (fake, upstream);
    let encrypt = RawRequest::signed_kms(&host, ENCRYPT, &encrypt_body()).to_bytes();
    let large = RawRequest::signed_kms(&host, TAG_RESOURCE, &tag_body(262_144)).to_bytes();

    measure(
        at,
        "HTTP/1.1 connection idle after an Encrypt",
        1000,
        |addr| {
            open_many(1000, move || {
                let encrypt = encrypt.clone();
                async move {
                    let mut conn = RawConn::connect(addr).await.unwrap();
                    conn.write(&encrypt).await.unwrap();
                    assert_eq!(conn.read_response().await.unwrap().status, 200);
                    conn
                }
            })
        },
    )
    .await;
    measure(
        at,
        "HTTP/1.1 connection idle after a 256 KiB tag change",
        500,
        |addr| {
            open_many(500, move || {
                let large = large.clone();
                async move { idle_after_large_body(addr, large).await }
            })
        },
    )
    .await;
    measure(at, "HTTP/1.1 connection with 63 KiB of a head", 500, |addr| {
        open_many(500, move || async move {
            let mut conn = RawConn::connect(addr).await.unwrap();
            let mut head = b"POST / HTTP/1.1\r\nHost: kms.us-east-1.amazonaws.com\r\n".to_vec();
            while head.len() < 63 * 1024 {
                head.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
            }
            conn.write(&head).await.unwrap();
            conn
        })
    })
    .await;
    let h2_idle = measure(at, "HTTP/2 connection idle", 200, |addr| {
        let host = host.clone();
        open_many(200, move || {
            let host = host.clone();
            async move { h2_streams_open(addr, host, 0, 0).await }
        })
    })
    .await;
    for pad in [0, 14 * 1024] {
        let per_connection = measure(
            at,
            &format!("HTTP/2 connection with 16 streams forwarded, bodies withheld, {pad} bytes of padding header each"),
            50,
            |addr| {
                let host = host.clone();
                open_many(50, move || {
                    let host = host.clone();
                    async move { h2_streams_open(addr, host, 16, pad).await }
                })
            },
        )
        .await;
        eprintln!(
            "FIGURE per HTTP/2 stream ({pad} bytes of padding): {} KiB",
            per_connection.saturating_sub(h2_idle) / 16 / 1024
        );
    }
}
