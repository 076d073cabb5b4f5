//! Request smuggling and framing attacks (research notes C.3-C.5, C.10-C.11), in the style of
//! sozu's `h1_security_tests`: one raw-socket test per attack, HTTP/1.1 and HTTP/2 (prior
//! knowledge, frames built by hand).
//!
//! Every test asserts the three things that matter, whatever the proxy does with the attack
//! (answer 4xx, or close the connection):
//! 1. nothing reached the upstream but the requests the client framed plainly: once a sentinel
//!    request sent afterwards has arrived, the fake KMS's recorded requests are exactly those
//!    (target, body, signature verified), and it saw no other request head;
//! 2. no tag-bearing request reached the upstream uninspected: each one the fake recorded has an
//!    `allow` decision record with the same tags, and an outcome record;
//! 3. the proxy still serves: a signed Encrypt on a new connection gets 200 and verifies.
//!
//! The comment on each test says, after "Asserted:", which answer the proxy gives (status,
//! `x-kms-tag-guard` kind, whether the connection then closes), and the test checks that too.
//! Every read has a timeout; a proxy that neither answers nor closes fails the test.

mod common;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use common::fake_kms::Recorded;
use common::raw::{RawConn, RawRequest, RawResponse};
use common::sentinel::{is_sentinel, seen_besides_sentinels, send_sentinel};
use common::sigv4;
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
const ENCRYPT: &str = "TrentService.Encrypt";
const TAG_RESOURCE: &str = "TrentService.TagResource";
const CONTENT_TYPE: &str = "application/x-amz-json-1.1";
/// The operations whose requests the proxy must inspect before KMS sees them: those that change
/// tags or aliases.
const TAG_OPERATIONS: [&str; 7] = [
    "TagResource",
    "UntagResource",
    "CreateKey",
    "ReplicateKey",
    "CreateAlias",
    "UpdateAlias",
    "DeleteAlias",
];
/// The longest any single answer may take.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// Bodies and requests
// ---------------------------------------------------------------------------------------------

fn encrypt_body() -> Vec<u8> {
    format!(r#"{{"KeyId":"{KEY}","Plaintext":"aGVsbG8="}}"#).into_bytes()
}

/// A TagResource body the test policy allows.
fn allowed_tags() -> Vec<u8> {
    format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:owner","TagValue":"payments"}}]}}"#)
        .into_bytes()
}

/// A TagResource body the test policy forbids (rule `abac-keys`).
fn forbidden_tags() -> Vec<u8> {
    format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"Project","TagValue":"x"}}]}}"#).into_bytes()
}

/// A complete, correctly signed TagResource request with a forbidden tag: what the attacks try
/// to get past the proxy.
fn smuggled_tag_request(host: &str) -> Vec<u8> {
    RawRequest::signed_kms(host, TAG_RESOURCE, &forbidden_tags()).to_bytes()
}

/// The chunked encoding of `body` as one chunk.
fn one_chunk(body: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n0\r\n\r\n");
    out
}

/// `head` (ending in the blank line) with `lines` inserted verbatim before the blank line.
fn with_raw_lines(head: &[u8], lines: &[&[u8]]) -> Vec<u8> {
    let mut out = head
        .strip_suffix(b"\r\n")
        .expect("a head ends in a blank line")
        .to_vec();
    for line in lines {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 answers
// ---------------------------------------------------------------------------------------------

/// What the proxy did with a request on one connection.
#[derive(Debug)]
enum Answer {
    Response(RawResponse),
    /// The connection ended (EOF or reset) before a complete response.
    Closed(String),
}

impl Answer {
    fn status(&self) -> Option<u16> {
        match self {
            Answer::Response(r) => Some(r.status),
            Answer::Closed(_) => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Answer::Response(r) => format!(
                "{} (x-kms-tag-guard {:?}) {}",
                r.status,
                r.header("x-kms-tag-guard"),
                r.body_str()
            ),
            Answer::Closed(e) => format!("closed: {e}"),
        }
    }
}

/// Writes `bytes` (the proxy may close before reading them all) and reads one answer.
async fn exchange(conn: &mut RawConn, bytes: &[u8]) -> Answer {
    let _ = conn.write(bytes).await;
    next_answer(conn, READ_TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("the proxy neither answered nor closed within {READ_TIMEOUT:?}"))
}

/// The next answer on `conn`, `None` if there was neither an answer nor a close in `timeout`.
async fn next_answer(conn: &mut RawConn, timeout: Duration) -> Option<Answer> {
    match conn.read_response_within(timeout).await {
        Ok(response) => Some(Answer::Response(response)),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => None,
        Err(e) => Some(Answer::Closed(e.to_string())),
    }
}

/// A fresh connection to the proxy carrying `bytes`, and its first answer.
async fn send_raw(proxy: &TestProxy, bytes: &[u8]) -> (RawConn, Answer) {
    let mut conn = RawConn::connect(proxy.addr).await.expect("connect");
    let answer = exchange(&mut conn, bytes).await;
    (conn, answer)
}

/// The proxy closes the connection after its answer (EOF or a reset within [`READ_TIMEOUT`]).
async fn assert_closes(case: &str, conn: &mut RawConn) {
    assert!(
        conn.is_closed_within(READ_TIMEOUT).await,
        "{case}: the connection stayed open after the answer"
    );
}

/// The connection stays open after the answer: an Encrypt on it gets 200 from the upstream.
async fn assert_stays_open(case: &str, fake: &FakeKms, conn: &mut RawConn) {
    let request = RawRequest::signed_kms(&fake.host(), ENCRYPT, &encrypt_body());
    let answer = exchange(conn, &request.to_bytes()).await;
    assert_ok(
        &format!("{case}: the next request on the connection"),
        &answer,
    );
}

/// The attack was refused: a 4xx answer, or the connection closed without one.
fn assert_refused(case: &str, answer: &Answer) {
    match answer {
        Answer::Response(r) => assert!(
            (400..500).contains(&r.status),
            "{case}: expected a refusal, got {}",
            answer.describe()
        ),
        Answer::Closed(_) => {}
    }
}

/// A proxy-made KMS-shaped 400 refusal of this kind (`reject` or `deny`).
fn assert_proxy_refusal(case: &str, answer: &Answer, kind: &str) {
    assert_proxy_answer(case, answer, 400, kind);
}

/// A proxy-made KMS-shaped refusal with this status and `x-kms-tag-guard` kind.
fn assert_proxy_answer(case: &str, answer: &Answer, status: u16, kind: &str) {
    let Answer::Response(r) = answer else {
        panic!(
            "{case}: expected a {status} {kind}, got {}",
            answer.describe()
        );
    };
    assert_eq!(r.status, status, "{case}: {}", answer.describe());
    assert_eq!(r.json()["__type"], "TagException", "{case}");
    assert_eq!(r.header("x-kms-tag-guard"), Some(kind), "{case}");
}

fn assert_ok(case: &str, answer: &Answer) {
    assert_eq!(answer.status(), Some(200), "{case}: {}", answer.describe());
}

// ---------------------------------------------------------------------------------------------
// What reached the upstream
// ---------------------------------------------------------------------------------------------

/// A request the client framed plainly, which may reach the upstream.
struct Plain {
    target: &'static str,
    body: Vec<u8>,
    /// It must have reached the upstream (else it may have).
    required: bool,
}

fn arrives(target: &'static str, body: Vec<u8>) -> Plain {
    Plain {
        target,
        body,
        required: true,
    }
}

fn may_arrive(target: &'static str, body: Vec<u8>) -> Plain {
    Plain {
        target,
        body,
        required: false,
    }
}

fn show(rec: &Recorded) -> String {
    format!(
        "#{} {:?} body {:?}",
        rec.seq,
        rec.target,
        String::from_utf8_lossy(&rec.body)
    )
}

/// Checks, once a sentinel sent now has reached the upstream, that the upstream received exactly
/// the plainly framed requests in `plain` (those marked `required`, and maybe the others), each
/// correctly signed and framed afresh; that it saw no other request head; and that every
/// tag-bearing request it received was inspected and allowed by the proxy first.
async fn assert_nothing_smuggled(case: &str, fake: &FakeKms, proxy: &TestProxy, plain: &[Plain]) {
    let (recorded, heads) = seen_besides_sentinels(case, fake, proxy.addr).await;
    let mut used = vec![false; plain.len()];
    for rec in &recorded {
        let Some(i) = (0..plain.len()).find(|&i| {
            !used[i]
                && rec.target.as_deref() == Some(plain[i].target)
                && rec.body[..] == plain[i].body[..]
        }) else {
            panic!(
                "{case}: a request the client did not frame plainly reached the upstream: {}\nall: {:#?}",
                show(rec),
                recorded.iter().map(show).collect::<Vec<_>>()
            );
        };
        used[i] = true;
        rec.verified();
        if let Some(length) = rec.header("content-length") {
            assert_eq!(
                length,
                rec.body.len().to_string(),
                "{case}: framing of {}",
                show(rec)
            );
        }
    }
    for (p, used) in plain.iter().zip(&used) {
        assert!(
            !p.required || *used,
            "{case}: the plainly framed {} never reached the upstream: {:#?}",
            p.target,
            recorded.iter().map(show).collect::<Vec<_>>()
        );
    }
    // Heads the upstream saw, including requests whose body never completed.
    for progress in heads {
        assert!(
            plain
                .iter()
                .any(|p| progress.target.as_deref() == Some(p.target)),
            "{case}: the upstream saw the head of an unexpected request: {progress:?}"
        );
    }
    assert_tag_changes_were_inspected(case, &recorded, &proxy.settled_audit().await);
}

/// Every tag-bearing request the upstream received has its own `allow` decision record with the
/// same change, and an outcome record.
fn assert_tag_changes_were_inspected(case: &str, recorded: &[Recorded], audit: &[Value]) {
    let mut used: Vec<&str> = Vec::new();
    for rec in recorded {
        let Some(op) = rec.operation().filter(|op| TAG_OPERATIONS.contains(op)) else {
            continue;
        };
        let body = rec.json();
        let set: Vec<Value> = body
            .get("Tags")
            .and_then(Value::as_array)
            .map(|tags| {
                tags.iter()
                    .map(|t| json!({"key": t["TagKey"], "value": t["TagValue"]}))
                    .collect()
            })
            .unwrap_or_default();
        let remove = body.get("TagKeys").cloned().unwrap_or_else(|| json!([]));
        let alias = body.get("AliasName").cloned().unwrap_or(Value::Null);
        let decision = audit.iter().find(|r| {
            r["event"] == "decision"
                && r["operation"] == op
                && r.get("alias").cloned().unwrap_or(Value::Null) == alias
                && r["decision"] == "allow"
                && r["set"] == Value::Array(set.clone())
                && r["remove"] == remove
                && !used.contains(&r["request_id"].as_str().unwrap_or_default())
        });
        let decision = decision.unwrap_or_else(|| {
            panic!(
                "{case}: {} reached the upstream without a matching allow decision: {audit:#?}",
                show(rec)
            )
        });
        let id = decision["request_id"].as_str().expect("request_id");
        assert!(
            audit
                .iter()
                .any(|r| r["event"] == "outcome" && r["request_id"] == id),
            "{case}: no outcome record for {id}: {audit:#?}"
        );
        used.push(id);
    }
}

/// The audit log holds a `deny` decision for an unreadable request (rule `request`).
fn assert_audited_as_unreadable(case: &str, proxy: &TestProxy) {
    let audit = proxy.audit();
    assert!(
        audit.iter().any(|r| r["event"] == "decision"
            && r["decision"] == "deny"
            && r["violations"]
                .as_array()
                .is_some_and(|v| v.iter().any(|v| v["rule"] == "request"))),
        "{case}: no deny record with rule `request`: {audit:#?}"
    );
}

/// The proxy still serves: a signed Encrypt on a new connection gets 200, and exactly that
/// request reaches the upstream (by the time a sentinel sent after it has), its signature
/// verified there.
async fn assert_still_serving(case: &str, fake: &FakeKms, proxy: &TestProxy) {
    let before = fake.requests().iter().filter(|r| !is_sentinel(r)).count();
    let body = encrypt_body();
    let request = RawRequest::signed_kms(&fake.host(), ENCRYPT, &body);
    let (_conn, answer) = send_raw(proxy, &request.to_bytes()).await;
    assert_eq!(
        answer.status(),
        Some(200),
        "{case}: the next ordinary request failed: {}",
        answer.describe()
    );
    let (recorded, _) = seen_besides_sentinels(case, fake, proxy.addr).await;
    assert_eq!(
        recorded.len(),
        before + 1,
        "{case}: {:#?}",
        recorded.iter().map(show).collect::<Vec<_>>()
    );
    let last = &recorded[before];
    assert_eq!(last.operation(), Some("Encrypt"), "{case}");
    assert_eq!(&last.body[..], &body[..], "{case}");
    last.verified();
}

async fn setup() -> (FakeKms, TestProxy) {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    (fake, proxy)
}

/// Prints what the proxy did, for `--nocapture` runs.
fn note(case: &str, what: &str) {
    eprintln!("[{case}] {what}");
}

// ---------------------------------------------------------------------------------------------
// CL + TE on one request
// ---------------------------------------------------------------------------------------------

/// CL.TE: `Content-Length` (first) covers the chunked Encrypt body *and* a whole TagResource
/// request after the last chunk; `Transfer-Encoding: chunked` follows. A front end that
/// honoured TE and a back end that honoured CL would disagree on where the Encrypt ends.
///
/// Asserted: 400 `reject` from the proxy (both Transfer-Encoding and Content-Length), then
/// close: the bytes after the last chunk are never read as a request.
#[tokio::test]
async fn cl_then_te_the_bytes_after_the_last_chunk_never_become_a_request() {
    let case = "CL then TE";
    let (fake, proxy) = setup().await;
    let enc = encrypt_body();
    let mut body = one_chunk(&enc);
    body.extend_from_slice(&smuggled_tag_request(&fake.host()));
    let mut request = RawRequest::signed_kms(&fake.host(), ENCRYPT, &enc);
    request.set_header("Content-Length", &body.len().to_string());
    request.add_header("Transfer-Encoding", "chunked");
    let mut bytes = request.head_bytes();
    bytes.extend_from_slice(&body);

    let (mut conn, first) = send_raw(&proxy, &bytes).await;
    note(case, &first.describe());
    assert_proxy_refusal(case, &first, "reject");
    assert_closes(case, &mut conn).await;
    assert_nothing_smuggled(case, &fake, &proxy, &[]).await;
    assert_still_serving(case, &fake, &proxy).await;
}

/// TE.CL: `Transfer-Encoding: chunked` first, then `Content-Length` covering only the chunk-size
/// line. The one chunk is a whole signed TagResource request: a back end that honoured CL would
/// read it as the next request on the connection.
///
/// Asserted: 400 `reject` from the proxy (both Transfer-Encoding and Content-Length), then
/// close.
#[tokio::test]
async fn te_then_cl_a_request_inside_the_chunk_stays_body() {
    let case = "TE then CL";
    let (fake, proxy) = setup().await;
    let inner = smuggled_tag_request(&fake.host());
    let body = one_chunk(&inner);
    let size_line = format!("{:x}\r\n", inner.len());
    let mut request = RawRequest::signed_kms(&fake.host(), ENCRYPT, &inner);
    request.remove_header("Content-Length");
    request.add_header("Transfer-Encoding", "chunked");
    request.add_header("Content-Length", &size_line.len().to_string());
    let mut bytes = request.head_bytes();
    bytes.extend_from_slice(&body);

    let (mut conn, first) = send_raw(&proxy, &bytes).await;
    note(case, &first.describe());
    assert_proxy_refusal(case, &first, "reject");
    assert_closes(case, &mut conn).await;
    assert_nothing_smuggled(case, &fake, &proxy, &[]).await;
    assert_still_serving(case, &fake, &proxy).await;
}

// ---------------------------------------------------------------------------------------------
// TE + TE with an obfuscated second Transfer-Encoding
// ---------------------------------------------------------------------------------------------

/// An Encrypt whose chunked body (one chunk) is a whole signed TagResource request, with
/// `Content-Length` covering only the chunk-size line (what a server that ignored the
/// obfuscated TE would read), `Transfer-Encoding: chunked`, and then the extra raw `te_lines`.
/// Each case is refused with a 400 `reject` from the proxy, then the connection closes, and
/// nothing reaches the upstream.
async fn te_te(case: &str, te_lines: &[&[u8]]) {
    let (fake, proxy) = setup().await;
    let inner = smuggled_tag_request(&fake.host());
    let size_line = format!("{:x}\r\n", inner.len());
    let mut request = RawRequest::signed_kms(&fake.host(), ENCRYPT, &inner);
    request.set_header("Content-Length", &size_line.len().to_string());
    let mut bytes = with_raw_lines(&request.head_bytes(), te_lines);
    bytes.extend_from_slice(&one_chunk(&inner));

    let (mut conn, first) = send_raw(&proxy, &bytes).await;
    note(case, &first.describe());
    assert_proxy_refusal(case, &first, "reject");
    assert_closes(case, &mut conn).await;
    assert_nothing_smuggled(case, &fake, &proxy, &[]).await;
    assert_still_serving(case, &fake, &proxy).await;
}

/// Asserted (in `te_te`): 400 `reject` from the proxy (more than one Transfer-Encoding header),
/// then close.
#[tokio::test]
async fn te_chunked_then_te_xchunked() {
    te_te(
        "TE chunked + TE xchunked",
        &[
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding: xchunked",
        ],
    )
    .await;
}

/// Asserted (in `te_te`): 400 `reject` from the proxy (more than one Transfer-Encoding header),
/// then close.
#[tokio::test]
async fn te_xchunked_then_te_chunked() {
    te_te(
        "TE xchunked + TE chunked",
        &[
            b"Transfer-Encoding: xchunked",
            b"Transfer-Encoding: chunked",
        ],
    )
    .await;
}

/// Asserted (in `te_te`): 400 `reject` from the proxy (whitespace between a field name and the
/// colon is not valid HTTP/1.1), then close.
#[tokio::test]
async fn te_chunked_then_te_with_a_space_before_the_colon() {
    te_te(
        "TE chunked + `Transfer-Encoding : chunked`",
        &[
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding : chunked",
        ],
    )
    .await;
}

/// A tab is optional whitespace before a field value, so both headers say `chunked`.
///
/// Asserted (in `te_te`): 400 `reject` from the proxy (more than one Transfer-Encoding header),
/// then close.
#[tokio::test]
async fn te_chunked_then_te_with_a_tab_before_chunked() {
    te_te(
        "TE chunked + `Transfer-Encoding:\\tchunked`",
        &[
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding:\tchunked",
        ],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Repeated framing and routing headers
// ---------------------------------------------------------------------------------------------

/// Two different `Content-Length`s: one covers the Encrypt body, the other also a whole signed
/// TagResource request after it.
///
/// Asserted: 400 `reject` from the proxy (more than one Content-Length header), then close.
#[tokio::test]
async fn two_different_content_lengths() {
    let case = "two Content-Lengths";
    let (fake, proxy) = setup().await;
    let enc = encrypt_body();
    let inner = smuggled_tag_request(&fake.host());
    let mut request = RawRequest::signed_kms(&fake.host(), ENCRYPT, &enc);
    request.add_header("Content-Length", &(enc.len() + inner.len()).to_string());
    let mut bytes = request.head_bytes();
    bytes.extend_from_slice(&enc);
    bytes.extend_from_slice(&inner);

    let (mut conn, answer) = send_raw(&proxy, &bytes).await;
    note(case, &answer.describe());
    assert_proxy_refusal(case, &answer, "reject");
    assert_closes(case, &mut conn).await;
    assert_nothing_smuggled(case, &fake, &proxy, &[]).await;
    assert_still_serving(case, &fake, &proxy).await;
}

/// Two Host headers on a pass-through operation (Encrypt, signed for the first).
///
/// Asserted: 400 `reject` from the proxy's classifier (no audit record: not a tag change); the
/// connection stays open.
#[tokio::test]
async fn two_host_headers_on_a_pass_through_operation() {
    let case = "two Host headers on Encrypt";
    let (fake, proxy) = setup().await;
    let mut request = RawRequest::signed_kms(&fake.host(), ENCRYPT, &encrypt_body());
    request.add_header("Host", "kms.eu-west-1.amazonaws.com");

    let (mut conn, answer) = send_raw(&proxy, &request.to_bytes()).await;
    note(case, &answer.describe());
    assert_proxy_refusal(case, &answer, "reject");
    assert_nothing_smuggled(case, &fake, &proxy, &[]).await;
    assert!(proxy.audit().is_empty(), "{case}: {:?}", proxy.audit());
    assert_stays_open(case, &fake, &mut conn).await;
    assert_still_serving(case, &fake, &proxy).await;
}

// ---------------------------------------------------------------------------------------------
// Oversized heads
// ---------------------------------------------------------------------------------------------

/// One 100 KiB header on an allowed TagResource.
///
/// The proxy caps a request head at 64 KiB (hyper's read buffer): 431, nothing forwarded.
#[tokio::test]
async fn one_100_kib_header() {
    let case = "one 100 KiB header";
    let (fake, proxy) = setup().await;
    let padding = "a".repeat(100 * 1024);
    let mut request = RawRequest::signed_kms(&fake.host(), TAG_RESOURCE, &allowed_tags());
    request.add_header("X-Padding", &padding);

    let (_conn, answer) = send_raw(&proxy, &request.to_bytes()).await;
    note(case, &answer.describe());
    assert_refused(case, &answer);
    if let Answer::Response(r) = &answer {
        assert_eq!(r.status, 431, "{case}");
    }
    assert_nothing_smuggled(case, &fake, &proxy, &[]).await;
    assert_still_serving(case, &fake, &proxy).await;
}

/// 200 headers on an Encrypt.
///
/// Asserted: 431 `too-large` from the proxy (more than 64 header lines), then close.
#[tokio::test]
async fn two_hundred_headers() {
    let case = "200 headers";
    let (fake, proxy) = setup().await;
    let mut request = RawRequest::signed_kms(&fake.host(), ENCRYPT, &encrypt_body());
    for i in 0..200 {
        request.add_header(&format!("X-Filler-{i}"), "x");
    }

    let (mut conn, answer) = send_raw(&proxy, &request.to_bytes()).await;
    note(case, &answer.describe());
    assert_proxy_answer(case, &answer, 431, "too-large");
    assert_closes(case, &mut conn).await;
    assert_nothing_smuggled(case, &fake, &proxy, &[]).await;
    assert_still_serving(case, &fake, &proxy).await;
}

// ---------------------------------------------------------------------------------------------
// Malformed request lines and header lines
// ---------------------------------------------------------------------------------------------

/// An HTTP/0.9 request line (no version).
///
/// Asserted: 400 `reject` from the proxy (not a valid HTTP/1.1 head), then close.
#[tokio::test]
async fn http_0_9_request_line() {
    let case = "HTTP/0.9 GET /";
    let (fake, proxy) = setup().await;
    let (mut conn, answer) = send_raw(&proxy, b"GET /\r\n").await;
    note(case, &answer.describe());
    assert_proxy_refusal(case, &answer, "reject");
    assert_closes(case, &mut conn).await;
    assert_nothing_smuggled(case, &fake, &proxy, &[]).await;
    assert_still_serving(case, &fake, &proxy).await;
}

/// Requests whose every line ends in a bare LF. A forbidden TagResource must still be judged
/// (and denied), an allowed one, if accepted at all, judged and audited before it is forwarded.
///
/// Asserted: the proxy reads bare-LF heads; the forbidden request is denied by the policy (400
/// `deny`), the allowed one inspected, audited and forwarded (200) re-framed; each connection is
/// closed after its answer.
#[tokio::test]
async fn bare_lf_requests() {
    let case = "bare LF";
    let (fake, proxy) = setup().await;
    let bare_lf = |body: &[u8]| {
        let request = RawRequest::signed_kms(&fake.host(), TAG_RESOURCE, body);
        let head = String::from_utf8(request.head_bytes()).unwrap();
        let mut bytes = head.replace("\r\n", "\n").into_bytes();
        bytes.extend_from_slice(body);
        bytes
    };

    let (mut conn, forbidden) = send_raw(&proxy, &bare_lf(&forbidden_tags())).await;
    note(case, &format!("forbidden: {}", forbidden.describe()));
    assert_proxy_refusal(case, &forbidden, "deny");
    assert_closes(case, &mut conn).await;
    assert_nothing_smuggled(case, &fake, &proxy, &[]).await;

    let (mut conn, allowed) = send_raw(&proxy, &bare_lf(&allowed_tags())).await;
    note(case, &format!("allowed: {}", allowed.describe()));
    assert_ok(case, &allowed);
    assert_closes(case, &mut conn).await;
    assert_nothing_smuggled(
        case,
        &fake,
        &proxy,
        &[arrives(TAG_RESOURCE, allowed_tags())],
    )
    .await;
    assert_still_serving(case, &fake, &proxy).await;
}

/// A bare LF inside a header line: to a parser that splits lines on CRLF only, the request is an
/// Encrypt with a harmless `X-Note`; to one that accepts bare LF it carries a second
/// X-Amz-Target naming TagResource. Either way KMS must not see a TagResource.
///
/// Asserted: the proxy reads two X-Amz-Target headers and refuses the request (400 `reject`,
/// audited as a deny with rule `request` since it might have been a tag change), then closes
/// the connection.
#[tokio::test]
async fn bare_lf_inside_a_header_line_hides_a_second_target() {
    let case = "bare LF hides a second X-Amz-Target";
    let (fake, proxy) = setup().await;
    let body = forbidden_tags();
    let request = RawRequest::signed_kms(&fake.host(), ENCRYPT, &body);
    let mut bytes = with_raw_lines(
        &request.head_bytes(),
        &[b"X-Note: a\nX-Amz-Target: TrentService.TagResource"],
    );
    bytes.extend_from_slice(&body);

    let (mut conn, answer) = send_raw(&proxy, &bytes).await;
    note(case, &answer.describe());
    assert_proxy_refusal(case, &answer, "reject");
    assert_closes(case, &mut conn).await;
    assert_audited_as_unreadable(case, &proxy);
    assert_nothing_smuggled(case, &fake, &proxy, &[]).await;
    assert_still_serving(case, &fake, &proxy).await;
}

/// An obs-fold continuation line: a folding parser reads `X-Note: a X-Amz-Target: ...`, a
/// careless one a second X-Amz-Target naming TagResource.
///
/// Asserted: 400 `reject` from the proxy (obs-fold is not valid in a request head), then close.
#[tokio::test]
async fn obs_fold_continuation_line() {
    let case = "obs-fold";
    let (fake, proxy) = setup().await;
    let body = forbidden_tags();
    let request = RawRequest::signed_kms(&fake.host(), ENCRYPT, &body);
    let mut bytes = with_raw_lines(
        &request.head_bytes(),
        &[b"X-Note: a", b" X-Amz-Target: TrentService.TagResource"],
    );
    bytes.extend_from_slice(&body);

    let (mut conn, answer) = send_raw(&proxy, &bytes).await;
    note(case, &answer.describe());
    assert_proxy_refusal(case, &answer, "reject");
    assert_closes(case, &mut conn).await;
    assert_nothing_smuggled(case, &fake, &proxy, &[]).await;
    assert_still_serving(case, &fake, &proxy).await;
}

// ---------------------------------------------------------------------------------------------
// Tag requests behind a pass-through request on one connection
// ---------------------------------------------------------------------------------------------

/// An Encrypt whose Content-Length covers a whole signed TagResource request (inside `{`…`}`,
/// the shape every KMS body must have): the TagResource is only the Encrypt's body (streamed,
/// never a request). A plainly framed, allowed TagResource after it on the same connection is
/// read as a request and inspected.
///
/// Asserted: 200 (the Encrypt, body = the TagResource text), then 200 (the allowed TagResource,
/// audited).
#[tokio::test]
async fn a_tag_request_inside_an_encrypt_body_stays_body() {
    let case = "TagResource inside an Encrypt body";
    let (fake, proxy) = setup().await;
    let inner = [b"{".as_slice(), &smuggled_tag_request(&fake.host()), b"}"].concat();
    let encrypt = RawRequest::signed_kms(&fake.host(), ENCRYPT, &inner);
    let next = RawRequest::signed_kms(&fake.host(), TAG_RESOURCE, &allowed_tags());

    let (mut conn, first) = send_raw(&proxy, &encrypt.to_bytes()).await;
    note(case, &format!("Encrypt: {}", first.describe()));
    assert_ok(case, &first);
    let second = exchange(&mut conn, &next.to_bytes()).await;
    note(case, &format!("then TagResource: {}", second.describe()));
    assert_ok(case, &second);

    assert_nothing_smuggled(
        case,
        &fake,
        &proxy,
        &[
            arrives(ENCRYPT, inner),
            arrives(TAG_RESOURCE, allowed_tags()),
        ],
    )
    .await;
    assert_still_serving(case, &fake, &proxy).await;
}

/// Pipelined in one write: an Encrypt, a forbidden TagResource and an allowed TagResource.
/// Each tag request behind the pass-through one is read as its own request and judged.
///
/// Asserted: 200, 400 `deny`, 200.
#[tokio::test]
async fn pipelined_tag_requests_behind_an_encrypt_are_each_inspected() {
    let case = "pipelined Encrypt, forbidden and allowed TagResource";
    let (fake, proxy) = setup().await;
    let mut bytes = RawRequest::signed_kms(&fake.host(), ENCRYPT, &encrypt_body()).to_bytes();
    bytes.extend_from_slice(&smuggled_tag_request(&fake.host()));
    bytes.extend_from_slice(
        &RawRequest::signed_kms(&fake.host(), TAG_RESOURCE, &allowed_tags()).to_bytes(),
    );

    let (mut conn, first) = send_raw(&proxy, &bytes).await;
    let second = next_answer(&mut conn, READ_TIMEOUT).await.expect("answer");
    let third = next_answer(&mut conn, READ_TIMEOUT).await.expect("answer");
    note(
        case,
        &format!(
            "{} | {} | {}",
            first.describe(),
            second.describe(),
            third.describe()
        ),
    );
    assert_ok(case, &first);
    assert_proxy_refusal(case, &second, "deny");
    assert_ok(case, &third);
    assert_nothing_smuggled(
        case,
        &fake,
        &proxy,
        &[
            arrives(ENCRYPT, encrypt_body()),
            arrives(TAG_RESOURCE, allowed_tags()),
        ],
    )
    .await;
    assert_still_serving(case, &fake, &proxy).await;
}

/// A pass-through request whose body stops short of its Content-Length, then the client
/// half-closes. The proxy has already streamed the head and the bytes it had upstream; a proxy
/// that then put that upstream connection back in its pool would have the next client's request
/// read as the rest of this body (request desync). The pool is primed first, so the cut-short
/// request rides on a pooled upstream connection.
///
/// Asserted: 400 `reject` ("the request body broke off before it was complete"); the upstream
/// saw the head and the bytes sent, then the body break off; the upstream connection is not
/// reused (the next request is unaffected).
#[tokio::test]
async fn a_pass_through_body_cut_short_does_not_desync_the_upstream_pool() {
    let case = "pass-through body cut short";
    let (fake, proxy) = setup().await;
    assert_still_serving(case, &fake, &proxy).await;
    let enc = encrypt_body();
    let mut request = RawRequest::signed_kms(&fake.host(), ENCRYPT, &enc);
    request.set_header("Content-Length", &(enc.len() + 40).to_string());
    let mut conn = RawConn::connect(proxy.addr).await.expect("connect");
    conn.write(&request.to_bytes()).await.expect("write");
    // Cut only once the upstream holds the head and every byte sent, so it is cut mid-body.
    fake.wait_for_progress(READ_TIMEOUT, |p| {
        p.complete_at.is_none() && p.bytes_received == enc.len()
    })
    .await
    .expect("the pass-through body is streamed upstream");
    conn.stream.shutdown().await.expect("half-close");
    let answer = next_answer(&mut conn, READ_TIMEOUT)
        .await
        .expect("an answer or a close");
    note(case, &answer.describe());
    assert_proxy_refusal(case, &answer, "reject");
    let Answer::Response(response) = &answer else {
        unreachable!()
    };
    assert!(
        response.body_str().contains("the request body broke off"),
        "{case}: {}",
        response.body_str()
    );

    assert_nothing_smuggled(case, &fake, &proxy, &[arrives(ENCRYPT, enc)]).await;
    assert!(
        poll_until(READ_TIMEOUT, || fake
            .progress()
            .iter()
            .any(|p| p.error.is_some()))
        .await,
        "{case}: the upstream should have seen the body break off: {:?}",
        fake.progress()
    );
    assert_still_serving(case, &fake, &proxy).await;
}

/// h2c upgrade smuggling: an Encrypt asking to upgrade its connection to h2c. A proxy that
/// forwarded `Upgrade`/`HTTP2-Settings` and relayed a 101 would hand the client a raw tunnel to
/// KMS, past inspection. After the answer the client speaks HTTP/2 on the same connection
/// anyway, sending a forbidden TagResource.
///
/// Asserted: 200 for the Encrypt, which reaches the upstream without `Connection`, `Upgrade` or
/// `HTTP2-Settings` (the proxy never upgrades); the HTTP/2 preface that follows on the HTTP/1.1
/// connection makes the proxy close it without an answer.
#[tokio::test]
async fn h2c_upgrade_is_neither_forwarded_nor_honoured() {
    let case = "h2c upgrade";
    let (fake, proxy) = setup().await;
    let enc = encrypt_body();
    let mut request = RawRequest::signed_kms(&fake.host(), ENCRYPT, &enc);
    request.add_header("Connection", "Upgrade, HTTP2-Settings");
    request.add_header("Upgrade", "h2c");
    request.add_header("HTTP2-Settings", "AAMAAABkAAQCAAAAAAIAAAAA");
    let (mut conn, first) = send_raw(&proxy, &request.to_bytes()).await;
    note(case, &format!("upgrade request: {}", first.describe()));
    assert_ok(case, &first);

    let tags = forbidden_tags();
    let mut frames = H2_PREFACE.to_vec();
    frames.extend_from_slice(&h2_frame(SETTINGS, 0, 0, &[]));
    let block = hpack_block(&h2_kms_fields(&fake.host(), TAG_RESOURCE, &tags));
    frames.extend_from_slice(&h2_frame(HEADERS, END_HEADERS, 1, &block));
    frames.extend_from_slice(&h2_frame(DATA, END_STREAM, 1, &tags));
    let second = exchange(&mut conn, &frames).await;
    note(case, &format!("then HTTP/2 frames: {}", second.describe()));
    assert!(
        matches!(second, Answer::Closed(_)),
        "{case}: expected a close without an answer, got {}",
        second.describe()
    );

    assert_nothing_smuggled(case, &fake, &proxy, &[arrives(ENCRYPT, enc)]).await;
    let rec = &fake.requests()[0];
    for name in ["upgrade", "http2-settings", "connection"] {
        assert_eq!(
            rec.header(name),
            None,
            "{case}: {name} reached the upstream"
        );
    }
    assert_still_serving(case, &fake, &proxy).await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 with prior knowledge, by hand
// ---------------------------------------------------------------------------------------------

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const NO_ERROR: u32 = 0x0;
const PROTOCOL_ERROR: u32 = 0x1;
/// SETTINGS_MAX_FRAME_SIZE's initial value.
const MAX_FRAME: usize = 16_384;

fn h2_error_name(code: u32) -> String {
    match code {
        NO_ERROR => "NO_ERROR".into(),
        PROTOCOL_ERROR => "PROTOCOL_ERROR".into(),
        other => format!("error code {other:#x}"),
    }
}

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    assert!(len < 1 << 24);
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `prefix_bits`-bit prefix, the high bits of the first byte `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of "literal header field without indexing, new name" representations (RFC
/// 7541 §6.2.2), strings without Huffman coding: nothing enters either dynamic table.
fn hpack_block(fields: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        for s in [name, value] {
            hpack_int(&mut out, 0x00, 7, s.len());
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

fn hpack_int_decode(buf: &[u8], pos: &mut usize, prefix_bits: u32) -> Option<usize> {
    let max = (1usize << prefix_bits) - 1;
    let mut value = usize::from(*buf.get(*pos)?) & max;
    *pos += 1;
    if value < max {
        return Some(value);
    }
    let mut shift = 0;
    loop {
        let b = *buf.get(*pos)?;
        *pos += 1;
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Some(value);
        }
        if shift > 28 {
            return None;
        }
    }
}

/// Huffman-decodes a string of decimal digits (RFC 7541 Appendix B: `0`-`2` are 5-bit codes
/// 00000-00010, `3`-`9` 6-bit codes 011001-011111); `None` for anything else.
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let total = bytes.len() * 8;
    let bit = |i: usize| (bytes[i / 8] >> (7 - i % 8)) & 1;
    let mut i = 0;
    let mut out = String::new();
    while i < total {
        let rest = total - i;
        if rest < 8 && (i..total).all(|j| bit(j) == 1) {
            break; // EOS padding
        }
        if rest < 5 {
            return None;
        }
        let five = (i..i + 5).fold(0u8, |acc, j| acc << 1 | bit(j));
        i += 5;
        match five {
            0..=2 => out.push(char::from(b'0' + five)),
            0b01100..=0b01111 if i < total => {
                let six = five << 1 | bit(i);
                i += 1;
                match six {
                    0b011001..=0b011111 => out.push(char::from(b'3' + (six - 0b011001))),
                    _ => return None,
                }
            }
            _ => return None,
        }
    }
    Some(out)
}

/// The `:status` of a response header block (it comes first, RFC 9113 §8.3).
fn decode_status(block: &[u8]) -> Option<u16> {
    let mut pos = 0;
    // Dynamic table size updates may open a block.
    while block.get(pos)? & 0xe0 == 0x20 {
        hpack_int_decode(block, &mut pos, 5)?;
    }
    let first = *block.get(pos)?;
    const STATIC: [(usize, u16); 7] = [
        (8, 200),
        (9, 204),
        (10, 206),
        (11, 304),
        (12, 400),
        (13, 404),
        (14, 500),
    ];
    if first & 0x80 != 0 {
        let index = hpack_int_decode(block, &mut pos, 7)?;
        return STATIC.iter().find(|(i, _)| *i == index).map(|(_, s)| *s);
    }
    let prefix = if first & 0xc0 == 0x40 { 6 } else { 4 };
    let name_index = hpack_int_decode(block, &mut pos, prefix)?;
    if name_index == 0 {
        let len = hpack_int_decode(block, &mut pos, 7)?;
        let name = block.get(pos..pos + len)?;
        pos += len;
        if name != b":status" {
            return None;
        }
    } else if !STATIC.iter().any(|(i, _)| *i == name_index) {
        return None;
    }
    let huffman = block.get(pos)? & 0x80 != 0;
    let len = hpack_int_decode(block, &mut pos, 7)?;
    let raw = block.get(pos..pos + len)?;
    let text = if huffman {
        huffman_digits(raw)?
    } else {
        String::from_utf8(raw.to_vec()).ok()?
    };
    text.parse().ok()
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// The payload without padding (and without the priority fields of HEADERS).
    fn content(&self) -> Vec<u8> {
        let mut p = &self.payload[..];
        let mut pad = 0;
        if self.flags & PADDED != 0 && (self.kind == DATA || self.kind == HEADERS) {
            pad = usize::from(p[0]);
            p = &p[1..];
        }
        if self.kind == HEADERS && self.flags & PRIORITY != 0 {
            p = &p[5..];
        }
        p[..p.len() - pad].to_vec()
    }

    fn code(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }
}

/// What the proxy did with one HTTP/2 stream.
#[derive(Debug)]
enum H2Answer {
    Response { status: u16, body: Vec<u8> },
    Reset(u32),
    GoAway(u32),
    Closed,
}

impl H2Answer {
    fn status(&self) -> Option<u16> {
        match self {
            H2Answer::Response { status, .. } => Some(*status),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            H2Answer::Response { status, body } => {
                format!("{status} {}", String::from_utf8_lossy(body))
            }
            H2Answer::Reset(code) => format!("RST_STREAM {}", h2_error_name(*code)),
            H2Answer::GoAway(code) => format!("GOAWAY {}", h2_error_name(*code)),
            H2Answer::Closed => "closed".into(),
        }
    }
}

/// The stream was refused: RST_STREAM, GOAWAY, a close, or a 4xx response.
fn assert_h2_refused(case: &str, answer: &H2Answer) {
    if let Some(status) = answer.status() {
        assert!(
            (400..500).contains(&status),
            "{case}: expected a refusal, got {}",
            answer.describe()
        );
    }
}

/// The stream was reset with PROTOCOL_ERROR (h2 refuses a malformed request itself).
fn assert_h2_reset(case: &str, answer: &H2Answer) {
    assert!(
        matches!(answer, H2Answer::Reset(PROTOCOL_ERROR)),
        "{case}: expected RST_STREAM PROTOCOL_ERROR, got {}",
        answer.describe()
    );
}

struct H2Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl H2Conn {
    /// Connects and sends the connection preface and an empty SETTINGS frame.
    async fn connect(addr: SocketAddr) -> H2Conn {
        let stream = tokio::time::timeout(READ_TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        stream.set_nodelay(true).unwrap();
        let mut conn = H2Conn {
            stream,
            buf: Vec::new(),
        };
        let mut hello = H2_PREFACE.to_vec();
        hello.extend_from_slice(&h2_frame(SETTINGS, 0, 0, &[]));
        conn.send(&hello).await;
        conn
    }

    /// Writes, ignoring errors: the proxy may already have given up on the connection.
    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// A HEADERS frame, and CONTINUATION frames when the block is longer than `fragment`.
    async fn headers(
        &mut self,
        stream: u32,
        fields: &[(String, String)],
        end_stream: bool,
        fragment: usize,
    ) {
        let block = hpack_block(fields);
        let pieces: Vec<&[u8]> = block.chunks(fragment.min(MAX_FRAME)).collect();
        let mut out = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            let mut flags = if last { END_HEADERS } else { 0 };
            let kind = if i == 0 {
                if end_stream {
                    flags |= END_STREAM;
                }
                HEADERS
            } else {
                CONTINUATION
            };
            out.extend_from_slice(&h2_frame(kind, flags, stream, piece));
        }
        self.send(&out).await;
    }

    /// DATA frames carrying `pieces`, END_STREAM on the last one if `end_stream`.
    async fn data(&mut self, stream: u32, pieces: &[&[u8]], end_stream: bool) {
        let mut out = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            let flags = if last && end_stream { END_STREAM } else { 0 };
            out.extend_from_slice(&h2_frame(DATA, flags, stream, piece));
        }
        self.send(&out).await;
    }

    /// The next frame; `None` at EOF or a reset connection. Panics after `READ_TIMEOUT`.
    async fn read_frame(&mut self, deadline: tokio::time::Instant) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = usize::from(self.buf[0]) << 16
                    | usize::from(self.buf[1]) << 8
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let frame = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes(self.buf[5..9].try_into().unwrap())
                            & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(frame);
                }
            }
            let mut tmp = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut tmp)).await {
                Err(_) => panic!("HTTP/2: no answer and no close within {READ_TIMEOUT:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// Reads frames until the stream's response is complete, or it is reset, or the connection
    /// goes away. Acknowledges SETTINGS and PING on the way.
    async fn answer(&mut self, stream: u32) -> H2Answer {
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        let mut block: Option<Vec<u8>> = None;
        let mut block_ends_stream = false;
        let mut status: Option<u16> = None;
        let mut body = Vec::new();
        loop {
            let Some(frame) = self.read_frame(deadline).await else {
                return H2Answer::Closed;
            };
            match frame.kind {
                SETTINGS if frame.flags & ACK == 0 => {
                    self.send(&h2_frame(SETTINGS, ACK, 0, &[])).await;
                }
                PING if frame.flags & ACK == 0 => {
                    self.send(&h2_frame(PING, ACK, 0, &frame.payload)).await;
                }
                GOAWAY => {
                    let last_stream = frame.code(0) & 0x7fff_ffff;
                    let code = frame.code(4);
                    // A graceful GOAWAY that still covers the stream: its answer may follow.
                    if code != NO_ERROR || last_stream < stream {
                        return H2Answer::GoAway(code);
                    }
                }
                RST_STREAM if frame.stream == stream => return H2Answer::Reset(frame.code(0)),
                HEADERS | CONTINUATION if frame.stream == stream => {
                    let fragment = frame.content();
                    if frame.kind == HEADERS {
                        block = Some(fragment);
                        block_ends_stream = frame.flags & END_STREAM != 0;
                    } else {
                        block
                            .as_mut()
                            .expect("CONTINUATION after HEADERS")
                            .extend_from_slice(&fragment);
                    }
                    if frame.flags & END_HEADERS != 0 {
                        let complete = block.take().unwrap();
                        if status.is_none() {
                            let s = decode_status(&complete).unwrap_or_else(|| {
                                panic!("cannot read :status from {complete:02x?}")
                            });
                            // Interim (1xx) answers are skipped.
                            status = (s >= 200).then_some(s);
                        }
                        if block_ends_stream {
                            if let Some(status) = status {
                                return H2Answer::Response { status, body };
                            }
                        }
                    }
                }
                DATA if frame.stream == stream => {
                    body.extend_from_slice(&frame.content());
                    if frame.flags & END_STREAM != 0 {
                        let status = status.expect("DATA before the response HEADERS");
                        return H2Answer::Response { status, body };
                    }
                }
                _ => {}
            }
        }
    }
}

/// The header fields of a correctly signed KMS request over HTTP/2: `:authority` is the signed
/// host (there is no Host header).
fn h2_kms_fields(host: &str, target: &str, body: &[u8]) -> Vec<(String, String)> {
    let signed = sigv4::sign(
        "POST",
        host,
        target,
        body,
        ACCESS_KEY_ID,
        SECRET_KEY,
        REGION,
        None,
    );
    [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", host),
        ("content-type", CONTENT_TYPE),
        ("x-amz-target", target),
        ("x-amz-date", &signed.amz_date),
        ("authorization", &signed.authorization),
        ("content-length", &body.len().to_string()),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_owned(), v.to_owned()))
    .collect()
}

fn set_field(fields: &mut [(String, String)], name: &str, value: &str) {
    fields
        .iter_mut()
        .find(|(n, _)| n == name)
        .expect("field present")
        .1 = value.to_owned();
}

/// Sends one request on stream 1 of a new connection: its fields (HEADERS, CONTINUATION when
/// longer than `fragment`), then `data` as DATA frames, END_STREAM on the last.
async fn h2_request(
    proxy: &TestProxy,
    fields: &[(String, String)],
    data: &[&[u8]],
    fragment: usize,
) -> H2Answer {
    let mut conn = H2Conn::connect(proxy.addr).await;
    conn.headers(1, fields, data.is_empty(), fragment).await;
    if !data.is_empty() {
        conn.data(1, data, true).await;
    }
    conn.answer(1).await
}

/// A well-formed HTTP/2 TagResource with an allowed tag, its header block split over HEADERS
/// and CONTINUATION frames: inspected, audited, and forwarded over HTTP/1.1 with the Host taken
/// from `:authority`, so the signature still verifies at the fake.
///
/// Asserted: 200.
#[tokio::test]
async fn h2_allowed_tag_resource_is_forwarded_with_its_signature_intact() {
    let case = "h2 allowed TagResource";
    let (fake, proxy) = setup().await;
    let body = allowed_tags();
    let fields = h2_kms_fields(&fake.host(), TAG_RESOURCE, &body);
    let answer = h2_request(&proxy, &fields, &[&body], 100).await;
    note(case, &answer.describe());
    assert_eq!(answer.status(), Some(200), "{case}: {}", answer.describe());

    assert_nothing_smuggled(case, &fake, &proxy, &[arrives(TAG_RESOURCE, body)]).await;
    let rec = &fake.requests()[0];
    assert_eq!(rec.version, http::Version::HTTP_11, "{case}");
    assert_eq!(rec.header("host"), Some(&*fake.host()), "{case}");
    assert_eq!(rec.verified().access_key_id, ACCESS_KEY_ID);
    assert_still_serving(case, &fake, &proxy).await;
}

/// A well-formed HTTP/2 TagResource with a forbidden tag.
///
/// Asserted: 400 TagException (`deny`, rule abac-keys), nothing forwarded.
#[tokio::test]
async fn h2_forbidden_tag_resource_is_denied() {
    let case = "h2 forbidden TagResource";
    let (fake, proxy) = setup().await;
    let body = forbidden_tags();
    let fields = h2_kms_fields(&fake.host(), TAG_RESOURCE, &body);
    let answer = h2_request(&proxy, &fields, &[&body], MAX_FRAME).await;
    note(case, &answer.describe());
    let H2Answer::Response { status, body } = &answer else {
        panic!("{case}: expected a 400, got {}", answer.describe());
    };
    assert_eq!(*status, 400, "{case}: {}", answer.describe());
    let json: Value = serde_json::from_slice(body).expect("JSON error body");
    assert_eq!(json["__type"], "TagException", "{case}: {json}");
    let message = json["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("abac-keys") && message.contains("Project"),
        "{case}: {message}"
    );

    assert_nothing_smuggled(case, &fake, &proxy, &[]).await;
    let audit = proxy.audit();
    assert!(
        audit.iter().any(|r| r["event"] == "decision"
            && r["decision"] == "deny"
            && r["set"] == json!([{"key": "Project", "value": "x"}])),
        "{case}: {audit:#?}"
    );
    assert_still_serving(case, &fake, &proxy).await;
}

/// An HTTP/2 request with a second `:authority` (another region's KMS) right after the first.
///
/// Asserted: RST_STREAM PROTOCOL_ERROR from h2 (a repeated pseudo-header is malformed); the
/// proxy's pipeline never sees the request (no audit record).
#[tokio::test]
async fn h2_second_authority() {
    let case = "h2 second :authority";
    let (fake, proxy) = setup().await;
    let body = allowed_tags();
    let mut fields = h2_kms_fields(&fake.host(), TAG_RESOURCE, &body);
    fields.insert(
        4,
        (":authority".into(), "kms.eu-west-1.amazonaws.com".into()),
    );
    let answer = h2_request(&proxy, &fields, &[&body], MAX_FRAME).await;
    note(case, &answer.describe());
    assert_h2_reset(case, &answer);
    assert_nothing_smuggled(case, &fake, &proxy, &[]).await;
    assert!(proxy.audit().is_empty(), "{case}: {:#?}", proxy.audit());
    assert_still_serving(case, &fake, &proxy).await;
}

/// An HTTP/2 request with both `:authority` and a different `host` header.
///
/// Asserted: 400 `reject` from the proxy (Host and authority differ), audited as a deny with
/// rule `request`.
#[tokio::test]
async fn h2_authority_and_host_disagree() {
    let case = "h2 :authority vs host";
    let (fake, proxy) = setup().await;
    let body = allowed_tags();
    let mut fields = h2_kms_fields(&fake.host(), TAG_RESOURCE, &body);
    fields.push(("host".into(), "kms.eu-west-1.amazonaws.com".into()));
    let answer = h2_request(&proxy, &fields, &[&body], MAX_FRAME).await;
    note(case, &answer.describe());
    let H2Answer::Response { status: 400, body } = &answer else {
        panic!("{case}: expected a 400, got {}", answer.describe());
    };
    let json: Value = serde_json::from_slice(body).expect("JSON error body");
    assert_eq!(json["__type"], "TagException", "{case}: {json}");
    assert!(
        json["message"]
            .as_str()
            .is_some_and(|m| m.contains("differ")),
        "{case}: {json}"
    );
    assert_audited_as_unreadable(case, &proxy);
    assert_nothing_smuggled(case, &fake, &proxy, &[]).await;
    assert_still_serving(case, &fake, &proxy).await;
}

/// What the upstream saw after the priming Encrypt, sentinels aside: (target, bytes, complete,
/// error) per head.
fn upstream_heads(fake: &FakeKms) -> String {
    let sentinels: Vec<u64> = fake
        .requests()
        .iter()
        .filter(|r| is_sentinel(r))
        .map(|r| r.seq)
        .collect();
    let seen: Vec<_> = fake
        .progress()
        .iter()
        .skip(1)
        .filter(|p| !sentinels.contains(&p.seq))
        .map(|p| {
            (
                p.target.clone(),
                p.bytes_received,
                p.complete_at.is_some(),
                p.error.clone(),
            )
        })
        .collect();
    format!("upstream saw (after the priming Encrypt): {seen:?}")
}

/// H2.CL, DATA longer than `content-length`: after exactly `content-length` bytes comes a second
/// DATA frame holding a whole signed TagResource request. A downgrading proxy that copied every
/// DATA byte to a pooled HTTP/1.1 upstream connection would smuggle that request to KMS.
/// Three cases: a pass-through Encrypt and a tag-bearing TagResource with all frames in one
/// write, and a staged Encrypt whose extra DATA frame is sent only once the upstream holds the
/// whole declared request (so the proxy has already relayed it when the overflow shows).
///
/// Asserted: RST_STREAM PROTOCOL_ERROR from h2 (content-length overflow) in the one-write cases,
/// before anything goes upstream. Staged: the upstream gets the Encrypt's head and all but the
/// piece that completes its declared length, which is held until the stream shows how it ends;
/// the extra DATA resets the stream, so the extra bytes are never written upstream and the
/// body never arrives whole; the next request is unaffected.
#[tokio::test]
async fn h2_data_longer_than_content_length() {
    let case = "h2 DATA longer than content-length";
    let (fake, proxy) = setup().await;
    // Prime the upstream pool: the attack then rides on a pooled upstream connection.
    assert_still_serving(case, &fake, &proxy).await;
    let inner = smuggled_tag_request(&fake.host());

    let enc = encrypt_body();
    let fields = h2_kms_fields(&fake.host(), ENCRYPT, &enc);
    let encrypt = h2_request(&proxy, &fields, &[&enc, &inner], MAX_FRAME).await;
    note(case, &format!("Encrypt: {}", encrypt.describe()));
    assert_h2_reset(case, &encrypt);

    let tags = allowed_tags();
    let fields = h2_kms_fields(&fake.host(), TAG_RESOURCE, &tags);
    let tag = h2_request(&proxy, &fields, &[&tags, &inner], MAX_FRAME).await;
    note(case, &format!("TagResource: {}", tag.describe()));
    assert_h2_reset(case, &tag);
    assert_nothing_smuggled(case, &fake, &proxy, &[arrives(ENCRYPT, encrypt_body())]).await;
    note(case, &upstream_heads(&fake));

    let fields = h2_kms_fields(&fake.host(), ENCRYPT, &enc);
    let heads_before = fake.progress().len();
    let mut conn = H2Conn::connect(proxy.addr).await;
    conn.headers(1, &fields, false, MAX_FRAME).await;
    conn.data(1, &[&enc], false).await;
    // The upstream has the head; the piece that completes the declared length is held back
    // until the stream shows how it ends (trailers would be refused), so the extra DATA below
    // resets the stream before KMS has the body whole.
    assert!(
        poll_until(READ_TIMEOUT, || fake.progress().len() > heads_before).await,
        "{case}: the staged head reaches the upstream"
    );
    conn.data(1, &[&inner], true).await;
    let staged = conn.answer(1).await;
    note(case, &format!("staged Encrypt: {}", staged.describe()));
    if staged.status() != Some(200) {
        assert_h2_refused(case, &staged);
    }
    send_sentinel(case, &fake, proxy.addr).await;
    note(case, &upstream_heads(&fake));

    let plain = [
        arrives(ENCRYPT, encrypt_body()),
        may_arrive(ENCRYPT, enc.clone()),
        may_arrive(ENCRYPT, enc),
    ];
    assert_nothing_smuggled(case, &fake, &proxy, &plain).await;
    assert_still_serving(case, &fake, &proxy).await;
}

/// H2.CL, DATA shorter than `content-length` (END_STREAM early). A downgrading proxy that
/// forwarded the declared length would leave the upstream waiting for bytes that the next
/// request on the pooled connection would supply. Three cases: a pass-through Encrypt and a
/// tag-bearing TagResource with all frames in one write, and a staged Encrypt whose early
/// END_STREAM is sent only once the upstream holds its head and every byte sent so far.
///
/// Asserted: RST_STREAM PROTOCOL_ERROR from h2 (content-length underflow) in every case. In the
/// one-write cases nothing goes upstream; staged, the upstream sees the body break off (the
/// proxy drops that upstream connection) and the next request on the pool is unaffected.
#[tokio::test]
async fn h2_data_shorter_than_content_length() {
    let case = "h2 DATA shorter than content-length";
    let (fake, proxy) = setup().await;
    // Prime the upstream pool: the attack then rides on a pooled upstream connection.
    assert_still_serving(case, &fake, &proxy).await;

    let enc = encrypt_body();
    let mut fields = h2_kms_fields(&fake.host(), ENCRYPT, &enc);
    set_field(&mut fields, "content-length", &(enc.len() + 40).to_string());
    let encrypt = h2_request(&proxy, &fields, &[&enc], MAX_FRAME).await;
    note(case, &format!("Encrypt: {}", encrypt.describe()));
    assert_h2_reset(case, &encrypt);

    let tags = allowed_tags();
    let mut fields = h2_kms_fields(&fake.host(), TAG_RESOURCE, &tags);
    set_field(
        &mut fields,
        "content-length",
        &(tags.len() + 40).to_string(),
    );
    let tag = h2_request(&proxy, &fields, &[&tags], MAX_FRAME).await;
    note(case, &format!("TagResource: {}", tag.describe()));
    assert_h2_reset(case, &tag);
    assert_nothing_smuggled(case, &fake, &proxy, &[arrives(ENCRYPT, encrypt_body())]).await;
    note(case, &upstream_heads(&fake));

    let mut fields = h2_kms_fields(&fake.host(), ENCRYPT, &enc);
    set_field(&mut fields, "content-length", &(enc.len() + 40).to_string());
    let mut conn = H2Conn::connect(proxy.addr).await;
    conn.headers(1, &fields, false, MAX_FRAME).await;
    conn.data(1, &[&enc], false).await;
    fake.wait_for_progress(READ_TIMEOUT, |p| {
        p.complete_at.is_none() && p.bytes_received == enc.len()
    })
    .await
    .expect("the staged Encrypt's head and bytes reach the upstream");
    conn.data(1, &[b""], true).await;
    let staged = conn.answer(1).await;
    note(case, &format!("staged Encrypt: {}", staged.describe()));
    assert_h2_reset(case, &staged);
    let broke_off = poll_until(READ_TIMEOUT, || {
        fake.progress().iter().any(|p| p.error.is_some())
    })
    .await;
    note(case, &upstream_heads(&fake));
    assert!(
        broke_off,
        "{case}: the upstream should have seen the staged body break off: {}",
        upstream_heads(&fake)
    );

    let plain = [arrives(ENCRYPT, encrypt_body()), may_arrive(ENCRYPT, enc)];
    assert_nothing_smuggled(case, &fake, &proxy, &plain).await;
    assert_still_serving(case, &fake, &proxy).await;
}
