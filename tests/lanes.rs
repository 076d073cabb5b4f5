//! The general server's connections to KMS belong to one client connection each (issue 18):
//! a client that withholds bodies or reads nothing slows only its own exchanges; a malformed
//! answer is a 502 on both paths; trailers after a body's declared length are refused; an answer
//! that stalls mid-body is cut off; an exchange that broke after KMS had the request is recorded
//! `applied: "unknown"`, and one whose answer head arrived keeps that head's status.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::ops::{encrypt_body, tag_body};
use common::*;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a step may take before the test gives up on it: generous, never a speed check.
const STEP: Duration = Duration::from_secs(10);

type Sender = SendRequest<BoxBody<Bytes, Infallible>>;

/// An h2 connection to the proxy's plain listener (prior knowledge); `stream_window` is the
/// receive window it advertises for each stream (`Some(0)`: it reads nothing).
async fn h2_client(addr: SocketAddr, stream_window: Option<u32>) -> Sender {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    if let Some(window) = stream_window {
        builder.initial_stream_window_size(window);
    }
    let (sender, connection) = builder
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    tokio::spawn(connection);
    sender
}

/// A body that declares `len` bytes and never sends one.
struct Withheld(u64);

impl Body for Withheld {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Pending
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0)
    }
}

/// A request signed over `:authority` (as NodeHttp2Handler signs) to the proxy at `authority`.
fn over_authority(authority: &str, operation: &str, body: &str) -> http::Request<Full<Bytes>> {
    common::sigv4::signed_over_authority(
        authority,
        &format!("http://{authority}/"),
        operation,
        body.as_bytes(),
    )
}

/// A request signed over `host` (as every other SDK signs), sent over h2: its Host becomes the
/// `:authority`.
fn over_host(authority: &str, operation: &str, body: &str) -> http::Request<Full<Bytes>> {
    let raw = RawRequest::signed_kms(
        authority,
        &format!("TrentService.{operation}"),
        body.as_bytes(),
    );
    let mut builder = http::Request::post(format!("http://{authority}/"));
    for (name, value) in &raw.headers {
        if !name.eq_ignore_ascii_case("host") {
            builder = builder.header(name.as_str(), value.as_str());
        }
    }
    builder.body(Full::new(Bytes::from(raw.body))).unwrap()
}

fn boxed(request: http::Request<Full<Bytes>>) -> http::Request<BoxBody<Bytes, Infallible>> {
    request.map(|body| body.boxed())
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Sends and reads the whole answer, each within [`STEP`].
async fn call(sender: &mut Sender, request: http::Request<Full<Bytes>>) -> Answer {
    sender.ready().await.expect("h2 connection ready");
    let response = tokio::time::timeout(STEP, sender.send_request(boxed(request)))
        .await
        .expect("the answer's head within 10 s")
        .expect("an answer");
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(STEP, body.collect())
        .await
        .expect("the answer's body within 10 s")
        .expect("the answer's body")
        .to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// A client that opens streams and withholds their bodies fills only its own connection to KMS:
/// another client's requests go over another connection, and are answered.
#[tokio::test]
async fn withheld_bodies_stay_on_their_own_connection_to_kms() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let authority = proxy.addr.to_string();

    let mut hostile = h2_client(proxy.addr, None).await;
    let mut withheld = Vec::new();
    for _ in 0..10 {
        let request = over_authority(&authority, "Encrypt", &encrypt_body());
        let (parts, _) = request.into_parts();
        let request = http::Request::from_parts(parts, Withheld(4096).boxed());
        hostile.ready().await.unwrap();
        withheld.push(tokio::spawn(hostile.send_request(request)));
    }
    assert!(
        poll_until(STEP, || fake.progress().len() >= 10).await,
        "the withheld requests' heads reach KMS"
    );

    let mut victim = h2_client(proxy.addr, None).await;
    let encrypted = call(
        &mut victim,
        over_authority(&authority, "Encrypt", &encrypt_body()),
    )
    .await;
    assert_eq!(encrypted.status, 200, "{:?}", encrypted.body);
    assert!(encrypted.json()["CiphertextBlob"].is_string());
    let allowed = tag_body(&[("team:owner", "payments")]);
    let tagged = call(
        &mut victim,
        over_authority(&authority, "TagResource", &allowed),
    )
    .await;
    assert_eq!(tagged.status, 200, "{:?}", tagged.body);

    // One whole request from the hostile connection, to see where it reaches KMS from.
    let own = call(&mut hostile, over_authority(&authority, "ListKeys", "{}")).await;
    assert_eq!(own.status, 200);
    let requests = fake.requests();
    let peer_of = |operation: &str| {
        requests
            .iter()
            .find(|r| r.operation() == Some(operation))
            .unwrap_or_else(|| panic!("no {operation} reached KMS"))
            .peer
    };
    assert_eq!(
        peer_of("Encrypt"),
        peer_of("TagResource"),
        "the victim's own connection"
    );
    assert_ne!(
        peer_of("Encrypt"),
        peer_of("ListKeys"),
        "the hostile client's streams share no connection to KMS with the victim's"
    );
    for task in withheld {
        task.abort();
    }
}

/// A client that advertises a zero receive window and asks for large answers stalls only its
/// own connection to KMS: another client's answers arrive whole.
#[tokio::test]
async fn a_client_that_reads_nothing_does_not_stall_another() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let authority = proxy.addr.to_string();
    // 12 answers of ~700 KB: more than the 5 MiB an HTTP/2 connection to KMS may have unread.
    let plaintext = vec![b'x'; 512 * 1024];
    let large = serde_json::json!({
        "KeyId": common::fake_kms::DEFAULT_KEY_ID,
        "Plaintext": common::fake_kms::base64_encode(&plaintext),
    })
    .to_string();
    let mut hostile = h2_client(proxy.addr, Some(0)).await;
    let mut stuck = Vec::new();
    for _ in 0..12 {
        hostile.ready().await.unwrap();
        let request = boxed(over_authority(&authority, "Encrypt", &large));
        stuck.push(tokio::spawn(hostile.send_request(request)));
    }
    let hostile_peers: std::collections::HashSet<SocketAddr> = fake
        .wait_for_requests(12, STEP)
        .await
        .iter()
        .map(|r| r.peer)
        .collect();

    let mut victim = h2_client(proxy.addr, None).await;
    for round in 0..3 {
        let encrypted = call(
            &mut victim,
            over_authority(&authority, "Encrypt", &encrypt_body()),
        )
        .await;
        assert_eq!(encrypted.status, 200, "round {round}: {:?}", encrypted.body);
        assert!(encrypted.json()["CiphertextBlob"].is_string());
        let allowed = tag_body(&[("team:owner", "payments")]);
        let tagged = call(
            &mut victim,
            over_authority(&authority, "TagResource", &allowed),
        )
        .await;
        assert_eq!(tagged.status, 200, "round {round}: {:?}", tagged.body);
    }
    let victim_requests = &fake.requests()[12..];
    assert_eq!(victim_requests.len(), 6);
    for request in victim_requests {
        assert!(
            !hostile_peers.contains(&request.peer),
            "the victim's {:?} went over the hostile client's connection to KMS",
            request.operation()
        );
    }
    let records = proxy.settled_audit().await;
    let outcomes: Vec<_> = records.iter().filter(|r| r["event"] == "outcome").collect();
    assert_eq!(outcomes.len(), 3, "{records:#?}");
    for outcome in outcomes {
        assert_eq!(outcome["upstream_status"], 200, "{outcome}");
        assert_eq!(outcome["applied"], "yes", "{outcome}");
    }
    for task in stuck {
        task.abort();
    }
}

/// An upstream that reads each request head (and body, by Content-Length) and answers with
/// `answer`'s bytes, then keeps the connection open until the client closes it.
async fn scripted_upstream(answer: &'static [u8]) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap_or(0));
                    if buf.len() < end + 4 + length {
                        continue;
                    }
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                    // Hold the connection: the answer may promise more than it sends.
                    let mut rest = [0u8; 1024];
                    while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
                    return;
                }
            });
        }
    });
    (url, requests)
}

const SWITCHING: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n";
const TE_AND_CL: &[u8] =
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\ncontent-type: application/x-amz-json-1.1\r\n\r\n2\r\n{}\r\n0\r\n\r\n";

/// A `101`, or an answer framed by both Transfer-Encoding and Content-Length, is a 502 on the
/// general server as on the fast path: never relayed.
#[tokio::test]
async fn a_malformed_answer_is_a_502_on_both_paths() {
    let fake = FakeKms::start().await;
    for (answer, what) in [(SWITCHING, "101"), (TE_AND_CL, "TE + CL")] {
        let (url, requests) = scripted_upstream(answer).await;
        let proxy = start_proxy_to(&url, ProxyConfig::default()).await;
        let authority = proxy.addr.to_string();
        // The fast path.
        let raw = common::ops::call(proxy.addr, "Encrypt", &encrypt_body()).await;
        assert_eq!(raw.status, 502, "{what}, fast path: {}", raw.body_str());
        // The general server: HTTP/2, signed over host (HTTP/1.1 to KMS).
        let mut h2 = h2_client(proxy.addr, None).await;
        let answer = call(&mut h2, over_host(&authority, "Encrypt", &encrypt_body())).await;
        assert_eq!(answer.status, 502, "{what}, general: {:?}", answer.body);
        assert_eq!(answer.json()["__type"], "BadGateway", "{what}");
        assert_eq!(
            answer
                .headers
                .get("x-kms-tag-guard")
                .map(|v| v.to_str().unwrap()),
            Some("upstream-error"),
            "{what}"
        );
        // A tag change: the malformed answer is no outcome to trust.
        let allowed = tag_body(&[("team:owner", "payments")]);
        let tagged = call(&mut h2, over_host(&authority, "TagResource", &allowed)).await;
        assert_eq!(tagged.status, 502, "{what}, tag change: {:?}", tagged.body);
        assert!(
            requests.load(std::sync::atomic::Ordering::SeqCst) >= 3,
            "{what}"
        );
        let records = proxy.settled_audit().await;
        let outcome = records
            .iter()
            .find(|r| r["event"] == "outcome")
            .unwrap_or_else(|| panic!("{what}: {records:#?}"));
        assert_eq!(outcome["applied"], "unknown", "{what}: {outcome}");
    }
    assert_eq!(fake.count(), 0);
}

/// A body with trailers after its declared length is refused on h2 to HTTP/1.1 (where hyper
/// would stop reading at the length and drop them): KMS never receives the request whole.
#[tokio::test]
async fn trailers_on_h2_to_http1_are_refused() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let authority = proxy.addr.to_string();
    let mut h2 = h2_client(proxy.addr, None).await;
    for operation in ["Encrypt", "ListKeys"] {
        let body = if operation == "Encrypt" {
            encrypt_body()
        } else {
            "{}".to_owned()
        };
        let request = over_host(&authority, operation, &body);
        let (mut parts, _) = request.into_parts();
        parts
            .headers
            .insert("content-length", body.len().to_string().parse().unwrap());
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-amz-target", "TrentService.TagResource".parse().unwrap());
        let frames = Frames(
            [
                Frame::data(Bytes::from(body.clone())),
                Frame::trailers(trailers),
            ]
            .into(),
        );
        let request = http::Request::from_parts(parts, BoxBody::new(frames));
        h2.ready().await.unwrap();
        let response = tokio::time::timeout(STEP, h2.send_request(request))
            .await
            .expect("an answer within 10 s")
            .expect("an answer");
        let status = response.status();
        let body = tokio::time::timeout(STEP, response.into_body().collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        assert_eq!(status, 400, "{operation}: {body:?}");
        let json: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["__type"], "TagException", "{operation}");
        assert!(
            json["message"].as_str().unwrap().contains("trailers"),
            "{operation}: {json}"
        );
    }
    // KMS never had either request whole (the fake records a request once its body is in).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.count(), 0, "{:?}", fake.requests());
}

/// A body of the frames given, all ready at once.
struct Frames(std::collections::VecDeque<Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// An upstream that sends an answer head and the start of its body, then nothing more (the
/// connection stays open).
const STALLS: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-amz-json-1.1\r\nx-amzn-requestid: stalled-1\r\ncontent-length: 100\r\n\r\n{\"KeyId\":";

/// Reads from `stream` until it closes, within [`STEP`]: `None` if it stays open that long.
async fn read_to_close(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(STEP, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    });
    read.await.ok().map(|()| got)
}

/// A timer covers every answer body: one that stalls after its head is cut off after
/// `timeout_ms` without a piece, on the fast path and on the general server, pass-through and
/// tag changes alike; a tag change's outcome has the status its head carried.
#[tokio::test]
async fn an_answer_that_stalls_mid_body_is_cut_off_and_its_status_recorded() {
    let (url, _) = scripted_upstream(STALLS).await;
    let proxy = start_proxy_to(
        &url,
        ProxyConfig {
            upstream: "timeout_ms = 500".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let authority = proxy.addr.to_string();

    // The fast path: the head and the first bytes are relayed, then the connection is cut.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let request = common::ops::signed(proxy.addr, "Encrypt", &encrypt_body());
    stream.write_all(&request.to_bytes()).await.unwrap();
    let got = read_to_close(&mut stream)
        .await
        .expect("the fast path cuts a stalled answer off within 10 s");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("{\"KeyId\":"), "nothing made up: {text}");

    // The general server: the stream is reset rather than left open.
    let mut h2 = h2_client(proxy.addr, None).await;
    h2.ready().await.unwrap();
    let response = tokio::time::timeout(
        STEP,
        h2.send_request(boxed(over_host(&authority, "Encrypt", &encrypt_body()))),
    )
    .await
    .expect("a head within 10 s")
    .expect("a head");
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(STEP, response.into_body().collect())
        .await
        .expect("the general server cuts a stalled answer off within 10 s");
    assert!(body.is_err(), "a cut-off body never looks complete");

    // Tag changes, both paths: the client is told the exchange broke off; the outcome record
    // has the status KMS's head carried.
    let allowed = tag_body(&[("team:owner", "payments")]);
    let fast = common::ops::call(proxy.addr, "TagResource", &allowed).await;
    assert!(matches!(fast.status, 502 | 504), "{}", fast.body_str());
    let general = call(&mut h2, over_host(&authority, "TagResource", &allowed)).await;
    assert!(matches!(general.status, 502 | 504), "{:?}", general.body);
    let records = proxy.settled_audit().await;
    let outcomes: Vec<_> = records.iter().filter(|r| r["event"] == "outcome").collect();
    assert_eq!(outcomes.len(), 2, "{records:#?}");
    for outcome in outcomes {
        assert_eq!(outcome["upstream_status"], 200, "{outcome}");
        assert_eq!(outcome["applied"], "yes", "{outcome}");
        assert_eq!(outcome["aws_request_id"], "stalled-1", "{outcome}");
        assert!(outcome["error"].is_string(), "{outcome}");
    }
}

/// A plain HTTP/2 upstream that reads a request whole, then drops the connection unanswered.
async fn h2_upstream_that_breaks_after_the_body() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (broke, break_now) = tokio::sync::mpsc::channel::<()>(1);
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        let broke = broke.clone();
                        async move {
                            let _ = request.into_body().collect().await;
                            let _ = broke.send(()).await;
                            std::future::pending::<()>().await;
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
                        }
                    },
                );
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service);
                let mut break_now = break_now;
                tokio::select! {
                    _ = connection => {}
                    _ = break_now.recv() => {}
                }
            });
        }
    });
    url
}

/// A change an `http://` HTTP/2 upstream received whole, on a fresh connection that then broke,
/// may have been applied: a 502 the SDKs retry, recorded `applied: "unknown"` (not a 400 that
/// says nothing was sent).
#[tokio::test]
async fn a_change_sent_whole_on_a_fresh_h2_connection_that_broke_is_unknown() {
    let url = h2_upstream_that_breaks_after_the_body().await;
    let proxy = start_proxy_to(&url, ProxyConfig::default()).await;
    let authority = proxy.addr.to_string();
    let mut h2 = h2_client(proxy.addr, None).await;
    let allowed = tag_body(&[("team:owner", "payments")]);
    let answer = call(&mut h2, over_authority(&authority, "TagResource", &allowed)).await;
    assert_eq!(answer.status, 502, "{:?}", answer.body);
    assert_eq!(answer.json()["__type"], "BadGateway");
    let records = proxy.settled_audit().await;
    let outcome = records
        .iter()
        .find(|r| r["event"] == "outcome")
        .unwrap_or_else(|| panic!("{records:#?}"));
    assert_eq!(outcome["applied"], "unknown", "{outcome}");
}

/// Every connection to KMS is inside the descriptor budget, HTTP/2 streams included: clients
/// that open many streams signed over `host` (each its own HTTP/1.1 connection to KMS) under a
/// limit of 1,024 descriptors leave `accept` working and a new client served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_stay_inside_the_descriptor_budget() {
    let own = common::child::raise_own_nofile(4096);
    assert!(own >= 2048, "the test process may open only {own} files");
    let fake = FakeKms::start().await;
    let mut opts = common::child::ChildOptions::new(&fake.url());
    opts.nofile = Some(1024);
    let proxy = common::child::start_child(opts).await;
    assert_eq!(proxy.nofile_limit(), Some(1024));
    let authority = proxy.addr.to_string();
    let mut hostile = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..8 {
        let mut sender = h2_client(proxy.addr, None).await;
        for _ in 0..150 {
            let request = over_host(&authority, "Encrypt", &encrypt_body());
            let (parts, _) = request.into_parts();
            let request = http::Request::from_parts(parts, Withheld(4096).boxed());
            if sender.ready().await.is_err() {
                break;
            }
            streams.push(tokio::spawn(sender.send_request(request)));
        }
        hostile.push(sender);
    }
    // The streams reach the proxy and their heads go on to KMS, as far as they may.
    poll_until(Duration::from_secs(3), || fake.progress().len() >= 1200).await;
    let fds = proxy.open_fds();
    let heads = fake.progress().len();
    eprintln!("{fds} descriptors open; {heads} request heads reached KMS");
    assert!(fds < 1024, "{fds} descriptors open");
    // A new client is served, and accept never failed.
    let encrypted = common::ops::call(proxy.addr, "Encrypt", &encrypt_body()).await;
    assert_eq!(encrypted.status, 200, "{}", encrypted.body_str());
    let log = proxy.stderr();
    assert!(
        !log.contains("accept failed"),
        "accept ran out of descriptors:\n{log}"
    );
    for stream in streams {
        stream.abort();
    }
}

/// What a plain HTTP/2 upstream saw on each of its connections (by the proxy's address).
#[derive(Default)]
struct Seen {
    /// Per connection: requests received, and streams the proxy cancelled before an answer.
    by_peer: std::collections::HashMap<SocketAddr, (usize, usize)>,
}

/// Cancelled streams are counted when hyper drops their unfinished service future.
struct CountCancel(Arc<std::sync::Mutex<Seen>>, SocketAddr, bool);

impl Drop for CountCancel {
    fn drop(&mut self) {
        if !self.2 {
            let mut seen = self.0.lock().unwrap();
            seen.by_peer.entry(self.1).or_default().1 += 1;
        }
    }
}

/// A plain HTTP/2 upstream that answers `ListKeys` at once and never answers `Encrypt`.
async fn h2_upstream_that_holds_encrypts() -> (String, Arc<std::sync::Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let shared = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let seen = Arc::clone(&shared);
            let service =
                hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let seen = Arc::clone(&seen);
                    async move {
                        seen.lock().unwrap().by_peer.entry(peer).or_default().0 += 1;
                        let target = request
                            .headers()
                            .get("x-amz-target")
                            .map(|v| v.to_str().unwrap().to_owned())
                            .unwrap_or_default();
                        let mut guard = CountCancel(seen, peer, false);
                        if target.ends_with("Encrypt") {
                            std::future::pending::<()>().await;
                        }
                        guard.2 = true;
                        let mut answer =
                            http::Response::new(Full::new(Bytes::from_static(b"{\"Keys\":[]}")));
                        answer.headers_mut().insert(
                            "content-type",
                            "application/x-amz-json-1.1".parse().unwrap(),
                        );
                        Ok::<_, Infallible>(answer)
                    }
                });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (url, seen)
}

/// A client that cancels its streams has them reset on its own connection to KMS only: an
/// upstream with a rapid-reset limit would close that one, not everyone's.
#[tokio::test]
async fn cancelled_streams_are_reset_only_on_the_clients_own_connection_to_kms() {
    let (url, seen) = h2_upstream_that_holds_encrypts().await;
    let proxy = start_proxy_to(&url, ProxyConfig::default()).await;
    let authority = proxy.addr.to_string();
    let mut victim = h2_client(proxy.addr, None).await;
    let first = call(&mut victim, over_authority(&authority, "ListKeys", "{}")).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let victim_peer = {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.by_peer.len(), 1);
        *seen.by_peer.keys().next().unwrap()
    };

    let mut hostile = h2_client(proxy.addr, None).await;
    let received = |seen: &std::sync::Mutex<Seen>| -> usize {
        seen.lock().unwrap().by_peer.values().map(|(n, _)| n).sum()
    };
    for round in 0..40 {
        let before = received(&seen);
        hostile.ready().await.unwrap();
        let request = boxed(over_authority(&authority, "Encrypt", &encrypt_body()));
        let pending = tokio::spawn(hostile.send_request(request));
        assert!(
            poll_until(STEP, || received(&seen) > before).await,
            "round {round}: the request reaches the upstream"
        );
        pending.abort();
    }
    let cancelled = |seen: &std::sync::Mutex<Seen>| -> usize {
        seen.lock().unwrap().by_peer.values().map(|(_, c)| c).sum()
    };
    assert!(
        poll_until(STEP, || cancelled(&seen) >= 40).await,
        "every cancel reaches the upstream as a reset"
    );
    let last = call(&mut victim, over_authority(&authority, "ListKeys", "{}")).await;
    assert_eq!(last.status, 200, "{:?}", last.body);
    let seen = seen.lock().unwrap();
    let (victim_requests, victim_resets) = seen.by_peer[&victim_peer];
    assert_eq!(
        victim_requests, 2,
        "the victim's connection carried only its requests"
    );
    assert_eq!(
        victim_resets, 0,
        "none of the hostile client's cancels was reset on the victim's connection"
    );
}
