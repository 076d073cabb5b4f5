//! The fast HTTP/1.1 path (src/proxy/h1): one KMS connection per client connection, the client's
//! exact bytes forwarded, answers relayed in every framing KMS may use, and everything outside
//! its narrow shape handed to the general server mid-connection without losing a byte.
//!
//! A raw stand-in for KMS records the exact bytes of each request and the connection it came on;
//! the fake KMS of the other tests (which verifies SigV4) checks that signatures still hold.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::raw::{RawConn, RawRequest};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
const HOST: &str = "kms.us-east-1.amazonaws.com";

/// How the raw stand-in frames its answers.
#[derive(Clone, Copy, Debug)]
enum Framing {
    Length,
    /// Chunked, in three chunks with an extension and a trailer.
    Chunked,
    /// Content-Length, then the stand-in closes the connection.
    LengthThenClose,
    /// No length: the body ends when the stand-in closes.
    UntilClose,
    /// `100 Continue`, then the answer with a Content-Length, in one write.
    ContinueThenLength,
    /// `103 Early Hints` with headers, then the answer, in one write.
    EarlyHintsThenLength,
}

const ANSWER_BODY: &str =
    r#"{"KeyId":"arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"}"#;

/// (connection number, the request's exact bytes), in order of arrival.
type Log = Arc<Mutex<Vec<(usize, Vec<u8>)>>>;

/// A KMS stand-in speaking raw HTTP/1.1.
struct RawKms {
    addr: SocketAddr,
    /// (connection number, the request's exact bytes)
    requests: Log,
    /// How many connections the stand-in has closed (or lost).
    closed: Arc<AtomicUsize>,
}

impl RawKms {
    async fn start(framing: Framing) -> RawKms {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicUsize::new(0));
        let (recorded, counted) = (Arc::clone(&requests), Arc::clone(&closed));
        tokio::spawn(async move {
            let mut connection = 0;
            while let Ok((stream, _)) = listener.accept().await {
                connection += 1;
                let (recorded, counted) = (Arc::clone(&recorded), Arc::clone(&counted));
                tokio::spawn(async move {
                    serve(stream, connection, framing, recorded).await;
                    counted.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        RawKms {
            addr,
            requests,
            closed,
        }
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<(usize, Vec<u8>)> {
        self.requests.lock().unwrap().clone()
    }
}

async fn serve(
    mut stream: tokio::net::TcpStream,
    connection: usize,
    framing: Framing,
    recorded: Log,
) {
    let mut buf = Vec::new();
    loop {
        // One request: a head, then Content-Length bytes.
        let (head_len, body_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut request = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = request.parse(&buf) {
                let length = request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |h| {
                        std::str::from_utf8(h.value).unwrap().parse().unwrap()
                    });
                break (n, length);
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        while buf.len() < head_len + body_len {
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let request: Vec<u8> = buf.drain(..head_len + body_len).collect();
        recorded.lock().unwrap().push((connection, request));
        let answer = match framing {
            Framing::Length | Framing::LengthThenClose => format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-RequestId: raw-{connection}\r\nContent-Length: {}\r\n\r\n{ANSWER_BODY}",
                ANSWER_BODY.len()
            ),
            Framing::Chunked => {
                let (a, rest) = ANSWER_BODY.split_at(10);
                let (b, c) = rest.split_at(20);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{a}\r\n{:x}\r\n{b}\r\n{:x}\r\n{c}\r\n0\r\nx-trailer: 1\r\n\r\n",
                    a.len(),
                    b.len(),
                    c.len()
                )
            }
            Framing::UntilClose => format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\nConnection: close\r\n\r\n{ANSWER_BODY}"
            ),
            Framing::ContinueThenLength | Framing::EarlyHintsThenLength => {
                let interim = if matches!(framing, Framing::ContinueThenLength) {
                    "HTTP/1.1 100 Continue\r\n\r\n"
                } else {
                    "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\nX-Hint: 1\r\n\r\n"
                };
                format!(
                    "{interim}HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-RequestId: raw-{connection}\r\nContent-Length: {}\r\n\r\n{ANSWER_BODY}",
                    ANSWER_BODY.len()
                )
            }
        };
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        if matches!(framing, Framing::LengthThenClose | Framing::UntilClose) {
            return;
        }
    }
}

fn encrypt(host: &str) -> RawRequest {
    let body = format!(r#"{{"KeyId":"{KEY}","Plaintext":"aGVsbG8="}}"#);
    RawRequest::signed_kms(host, "TrentService.Encrypt", body.as_bytes())
}

fn allowed_tag_resource(host: &str) -> RawRequest {
    let body =
        format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:owner","TagValue":"payments"}}]}}"#);
    RawRequest::signed_kms(host, "TrentService.TagResource", body.as_bytes())
}

async fn proxy_in_front_of(kms: &RawKms) -> (FakeKms, TestProxy) {
    // The fake only provides the config's default endpoint; the raw stand-in replaces it.
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            endpoint: Some(kms.url()),
            ..ProxyConfig::default()
        },
    )
    .await;
    (fake, proxy)
}

#[tokio::test]
async fn requests_on_one_client_connection_share_one_kms_connection_and_keep_their_bytes() {
    let kms = RawKms::start(Framing::Length).await;
    let (_fake, proxy) = proxy_in_front_of(&kms).await;
    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    let mut sent = Vec::new();
    for _ in 0..3 {
        let request = encrypt(HOST).to_bytes();
        conn.write(&request).await.unwrap();
        let response = conn.read_response().await.unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body_str(), ANSWER_BODY);
        assert_eq!(response.header("x-amzn-requestid"), Some("raw-1"));
        sent.push(request);
    }
    let received = kms.requests();
    assert_eq!(received.len(), 3);
    for ((connection, bytes), sent) in received.iter().zip(&sent) {
        assert_eq!(*connection, 1, "every request on the first KMS connection");
        assert_eq!(bytes, sent, "forwarded byte for byte");
    }
}

#[tokio::test]
async fn pipelined_and_split_requests_are_forwarded_whole_and_in_order() {
    let kms = RawKms::start(Framing::Length).await;
    let (_fake, proxy) = proxy_in_front_of(&kms).await;
    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    let first = encrypt(HOST).to_bytes();
    let second = allowed_tag_resource(HOST).to_bytes();
    // Both requests in one write, then a third byte by byte across its head and body.
    conn.write(&[first.clone(), second.clone()].concat())
        .await
        .unwrap();
    assert_eq!(conn.read_response().await.unwrap().status, 200);
    assert_eq!(conn.read_response().await.unwrap().status, 200);
    let third = encrypt(HOST).to_bytes();
    for byte in &third {
        conn.write(std::slice::from_ref(byte)).await.unwrap();
    }
    assert_eq!(conn.read_response().await.unwrap().status, 200);
    let received: Vec<Vec<u8>> = kms.requests().into_iter().map(|(_, b)| b).collect();
    assert_eq!(received, vec![first, second, third]);
    let audit = proxy.wait_for_audit(2).await;
    assert_eq!(audit[0]["decision"], "allow");
    assert_eq!(audit[1]["event"], "outcome");
    assert_eq!(audit[1]["aws_request_id"], "raw-1");
}

#[tokio::test]
async fn connection_and_keep_alive_headers_are_dropped_and_the_signature_still_holds() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let mut request = encrypt(&fake.host());
    request
        .add_header("Connection", "keep-alive")
        .add_header("Keep-Alive", "timeout=5");
    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    conn.write(&request.to_bytes()).await.unwrap();
    assert_eq!(conn.read_response().await.unwrap().status, 200);
    let recorded = fake.last().unwrap();
    assert!(recorded.signature.is_ok(), "{:?}", recorded.signature);
    assert!(recorded.headers.get("connection").is_none());
    assert!(recorded.headers.get("keep-alive").is_none());

    // `Connection: close`: answered, told so, and closed.
    let mut request = encrypt(&fake.host());
    request.add_header("Connection", "close");
    conn.write(&request.to_bytes()).await.unwrap();
    let response = conn.read_response().await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.header("connection"), Some("close"));
    assert!(conn.is_closed_within(Duration::from_secs(2)).await);
}

#[tokio::test]
async fn every_answer_framing_is_relayed() {
    for framing in [Framing::Chunked, Framing::UntilClose] {
        let kms = RawKms::start(framing).await;
        let (_fake, proxy) = proxy_in_front_of(&kms).await;
        let mut conn = RawConn::connect(proxy.addr).await.unwrap();
        for request in [encrypt(HOST), allowed_tag_resource(HOST)] {
            conn.write(&request.to_bytes()).await.unwrap();
            let response = conn.read_response().await.unwrap();
            assert_eq!(response.status, 200, "{framing:?}");
            assert_eq!(response.body_str(), ANSWER_BODY, "{framing:?}");
            if matches!(framing, Framing::UntilClose) {
                // The body ended with the KMS connection, so the client's ends too.
                assert_eq!(response.header("connection"), Some("close"));
                assert!(conn.is_closed_within(Duration::from_secs(2)).await);
                conn = RawConn::connect(proxy.addr).await.unwrap();
            }
        }
        let connections: Vec<usize> = kms.requests().iter().map(|(c, _)| *c).collect();
        match framing {
            // Reused: the chunked answer's end was found.
            Framing::Chunked => assert_eq!(connections, [1, 1]),
            // KMS closed after the answer: a new connection for the next request.
            _ => assert_eq!(connections, [1, 2], "{framing:?}"),
        }
        let audit = proxy.wait_for_audit(2).await;
        assert_eq!(audit[1]["upstream_status"], 200, "{framing:?}");
    }
}

#[tokio::test]
async fn a_refused_request_mid_connection_goes_to_the_general_server_with_nothing_lost() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    conn.write(&encrypt(&fake.host()).to_bytes()).await.unwrap();
    assert_eq!(conn.read_response().await.unwrap().status, 200);
    assert_eq!(fake.count(), 1);

    // A tag change with its target twice, pipelined with an allowed request behind it.
    let mut refused = allowed_tag_resource(&fake.host());
    refused.add_header("X-Amz-Target", "TrentService.TagResource");
    let behind = encrypt(&fake.host()).to_bytes();
    conn.write(&[refused.to_bytes(), behind].concat())
        .await
        .unwrap();
    let response = conn.read_response().await.unwrap();
    assert_eq!(response.status, 400);
    assert_eq!(response.json()["__type"], "TagException");
    assert_eq!(response.header("x-kms-tag-guard"), Some("reject"));
    let response = conn.read_response().await.unwrap();
    assert_eq!(response.status, 200);
    let operations: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| r.operation().unwrap().to_owned())
        .collect();
    assert_eq!(
        operations,
        ["Encrypt", "Encrypt"],
        "nothing refused reached KMS"
    );
    let audit = proxy.wait_for_audit(1).await;
    assert_eq!(audit[0]["decision"], "deny");
}

#[tokio::test]
async fn a_denied_tag_change_is_answered_and_the_connection_serves_on() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    let body = format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"Project","TagValue":"x"}}]}}"#);
    let denied = RawRequest::signed_kms(&fake.host(), "TrentService.TagResource", body.as_bytes());
    conn.write(&denied.to_bytes()).await.unwrap();
    let response = conn.read_response().await.unwrap();
    assert_eq!(response.status, 400);
    assert_eq!(response.json()["__type"], "TagException");
    assert_eq!(response.header("x-kms-tag-guard"), Some("deny"));
    assert_eq!(fake.count(), 0, "nothing reached KMS");

    conn.write(&allowed_tag_resource(&fake.host()).to_bytes())
        .await
        .unwrap();
    assert_eq!(conn.read_response().await.unwrap().status, 200);
    let recorded = fake.last().unwrap();
    assert!(recorded.signature.is_ok(), "{:?}", recorded.signature);
    let audit = proxy.wait_for_audit(3).await;
    let decisions: Vec<&str> = audit.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(decisions, ["decision", "decision", "outcome"]);
    assert_eq!(audit[0]["decision"], "deny");
    assert_eq!(audit[1]["decision"], "allow");
}

#[tokio::test]
async fn a_kms_connection_closed_while_idle_is_replaced() {
    let kms = RawKms::start(Framing::LengthThenClose).await;
    let (_fake, proxy) = proxy_in_front_of(&kms).await;
    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    for round in 1..=3 {
        conn.write(&encrypt(HOST).to_bytes()).await.unwrap();
        assert_eq!(conn.read_response().await.unwrap().status, 200);
        // The stand-in has closed its end before the next request.
        assert!(poll_until(Duration::from_secs(5), || kms.closed() >= round).await);
    }
    let connections: Vec<usize> = kms.requests().iter().map(|(c, _)| *c).collect();
    assert_eq!(connections, [1, 2, 3]);
}

/// An interim answer (`100`, or `103` with headers) that arrives in the same read as the final
/// one is skipped, and the final one relayed at once, on the fast path and on the general
/// server; a tag change's outcome record says 200, not a timeout.
#[tokio::test]
async fn interim_answers_in_the_same_read_as_the_final_one_are_skipped() {
    for framing in [Framing::ContinueThenLength, Framing::EarlyHintsThenLength] {
        let kms = RawKms::start(framing).await;
        let fake = FakeKms::start().await;
        // A short upstream timeout: waiting for more bytes would show as a 504 within it.
        let proxy = start_proxy_with(
            &fake,
            ProxyConfig {
                endpoint: Some(kms.url()),
                upstream: "timeout_ms = 3000".into(),
                ..ProxyConfig::default()
            },
        )
        .await;
        let mut expect = allowed_tag_resource(HOST);
        expect.add_header("Expect", "100-continue");
        for (path, request) in [
            ("fast path, Encrypt", encrypt(HOST)),
            ("fast path, TagResource", allowed_tag_resource(HOST)),
            ("general server, TagResource", expect),
        ] {
            let mut conn = RawConn::connect(proxy.addr).await.unwrap();
            conn.write(&request.to_bytes()).await.unwrap();
            let response = conn
                .read_response_within(Duration::from_secs(2))
                .await
                .unwrap_or_else(|e| panic!("{framing:?}, {path}: {e}"));
            assert_eq!(response.status, 200, "{framing:?}, {path}");
            assert_eq!(response.body_str(), ANSWER_BODY, "{framing:?}, {path}");
        }
        let audit = proxy.wait_for_audit(4).await;
        let outcomes: Vec<&serde_json::Value> =
            audit.iter().filter(|r| r["event"] == "outcome").collect();
        assert_eq!(outcomes.len(), 2, "{framing:?}: {audit:#?}");
        for outcome in outcomes {
            assert_eq!(outcome["upstream_status"], 200, "{framing:?}: {outcome}");
            assert_eq!(outcome["applied"], "yes", "{framing:?}: {outcome}");
        }
    }
}
