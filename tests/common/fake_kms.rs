//! An in-process fake of the KMS JSON API: verifies every request's SigV4 signature with the
//! independent verifier in `sigv4`, records every request, and answers like KMS would.
//!
//! It speaks HTTP/1.1 and HTTP/2 (prior knowledge on plain TCP; behind TLS whatever ALPN
//! picked, e.g. `h2` for `[b"h2", b"http/1.1"]`), and over h2 it verifies signatures whose
//! SignedHeaders hold `:authority` instead of `host` (see [`sigv4::verify_h2`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use super::sigv4::{self, VerifiedCredential};

/// The account id the fake puts in ARNs.
pub const ACCOUNT_ID: &str = "111122223333";
/// The key id the fake uses when a request names none (or an alias).
pub const DEFAULT_KEY_ID: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
/// Fake ciphertexts are this prefix followed by the plaintext (then base64 on the wire).
pub const CIPHERTEXT_PREFIX: &[u8] = b"fake-kms-ciphertext:";

/// One request the fake received (recorded once its whole body has arrived).
#[derive(Debug, Clone)]
pub struct Recorded {
    /// 0, 1, 2, ... in order of arrival of the request head.
    pub seq: u64,
    pub peer: SocketAddr,
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    /// Exactly as received (no `host` added for HTTP/2).
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The `X-Amz-Target` header, e.g. `TrentService.TagResource`.
    pub target: Option<String>,
    pub signature: Result<VerifiedCredential, String>,
    pub head_received_at: Instant,
    pub first_body_byte_at: Option<Instant>,
    /// When the whole body had arrived (= when it was recorded).
    pub received_at: Instant,
}

#[allow(dead_code)]
impl Recorded {
    /// The operation name: `X-Amz-Target` without the `TrentService.` prefix.
    pub fn operation(&self) -> Option<&str> {
        self.target
            .as_deref()
            .map(|t| t.strip_prefix("TrentService.").unwrap_or(t))
    }

    /// First value of a header, if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON (panics if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "recorded body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The verified credential; panics with the verifier's message if the signature failed.
    pub fn verified(&self) -> &VerifiedCredential {
        match &self.signature {
            Ok(c) => c,
            Err(e) => panic!(
                "request {} ({:?}) did not verify: {e}",
                self.seq, self.target
            ),
        }
    }
}

/// Live progress of a request body (also for requests still being received or aborted).
#[derive(Debug, Clone)]
pub struct Progress {
    pub seq: u64,
    pub target: Option<String>,
    pub head_received_at: Instant,
    pub first_body_byte_at: Option<Instant>,
    /// Body bytes received so far.
    pub bytes_received: usize,
    /// Set when the whole body arrived.
    pub complete_at: Option<Instant>,
    /// Set when reading the body failed (e.g. the sender went away mid-body).
    pub error: Option<String>,
}

/// Called synchronously with each recorded request, before the fake answers it.
pub type Hook = Arc<dyn Fn(&Recorded) + Send + Sync>;

#[derive(Default)]
struct State {
    next_seq: u64,
    requests: Vec<Recorded>,
    progress: Vec<Progress>,
    delay: Duration,
    hook: Option<Hook>,
    status_override: Option<(u16, String)>,
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking hook must not wedge every later test assertion.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update_progress(&self, seq: u64, f: impl FnOnce(&mut Progress)) {
        let mut st = self.lock();
        if let Some(p) = st.progress.iter_mut().find(|p| p.seq == seq) {
            f(p);
        }
    }
}

/// The fake KMS server. Dropping it stops the listener and every open connection.
pub struct FakeKms {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
    /// Set by [`FakeKms::start_tls`]: the URL scheme is `https` and the host `localhost`.
    tls: bool,
}

#[allow(dead_code)]
impl FakeKms {
    /// Listen on `127.0.0.1:0`, serving HTTP/1.1 and HTTP/2 (prior knowledge).
    pub async fn start() -> FakeKms {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake KMS");
        FakeKms::serve(listener)
    }

    /// Listen on `addr` (e.g. the port of a fake that was shut down, to play an upstream that
    /// restarts), serving like [`FakeKms::start`]. Retries the bind for up to 5 s while the port
    /// is still being released.
    pub async fn start_on(addr: SocketAddr) -> FakeKms {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("bind fake KMS on {addr}: {e}"),
            }
        };
        FakeKms::serve(listener)
    }

    /// Listen on `127.0.0.1:0` behind TLS with this certificate chain and key, offering these
    /// ALPN protocols (e.g. `[b"h2", b"http/1.1"]`, or none). Serves HTTP/1.1 and HTTP/2 inside
    /// whatever was negotiated; [`FakeKms::url`] is then `https://localhost:PORT`, so the chain
    /// should name `localhost`.
    pub async fn start_tls(
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        alpn: Vec<Vec<u8>>,
    ) -> FakeKms {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake KMS");
        FakeKms::serve_tls(listener, cert_chain, key, alpn)
    }

    /// Like [`FakeKms::start_tls`] on a given address (e.g. `127.0.0.1:443`, to play a real
    /// endpoint); the bind error when the address cannot be had.
    pub async fn try_start_tls_on(
        addr: SocketAddr,
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        alpn: Vec<Vec<u8>>,
    ) -> std::io::Result<FakeKms> {
        let listener = TcpListener::bind(addr).await?;
        Ok(FakeKms::serve_tls(listener, cert_chain, key, alpn))
    }

    fn serve_tls(
        listener: TcpListener,
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        alpn: Vec<Vec<u8>>,
    ) -> FakeKms {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(cert_chain, key)
        .expect("fake KMS certificate");
        config.alpn_protocols = alpn;
        let mut fake = FakeKms::serve_with(listener, Some(TlsAcceptor::from(Arc::new(config))));
        fake.tls = true;
        fake
    }

    fn serve(listener: TcpListener) -> FakeKms {
        FakeKms::serve_with(listener, None)
    }

    fn serve_with(listener: TcpListener, tls: Option<TlsAcceptor>) -> FakeKms {
        let addr = listener.local_addr().expect("fake KMS address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
        });
        let accept_shared = shared.clone();
        let task = tokio::spawn(async move {
            // Connection tasks live in this JoinSet: aborting the accept task drops it, which
            // aborts every connection as well.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let (stream, peer) = match accepted {
                            Ok(x) => x,
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        };
                        let _ = stream.set_nodelay(true);
                        let shared = accept_shared.clone();
                        let tls = tls.clone();
                        conns.spawn(async move {
                            match tls {
                                None => serve_connection(stream, shared, peer).await,
                                Some(acceptor) => {
                                    let accepted = tokio::time::timeout(
                                        Duration::from_secs(10),
                                        acceptor.accept(stream),
                                    )
                                    .await;
                                    if let Ok(Ok(stream)) = accepted {
                                        serve_connection(stream, shared, peer).await;
                                    }
                                }
                            }
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        FakeKms {
            addr,
            shared,
            task: Some(task),
            tls: false,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (`https://localhost:PORT` for [`FakeKms::start_tls`]).
    pub fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// `127.0.0.1:PORT` (what a client puts in `Host`; `localhost:PORT` behind TLS).
    pub fn host(&self) -> String {
        if self.tls {
            format!("localhost:{}", self.addr.port())
        } else {
            self.addr.to_string()
        }
    }

    /// All recorded requests, in the order they were recorded.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    pub fn count(&self) -> usize {
        self.shared.lock().requests.len()
    }

    /// The most recent recorded request.
    pub fn last(&self) -> Option<Recorded> {
        self.shared.lock().requests.last().cloned()
    }

    /// Forget recorded requests and progress (knobs are kept).
    pub fn clear(&self) {
        let mut st = self.shared.lock();
        st.requests.clear();
        st.progress.clear();
    }

    /// Body progress of every request seen (including incomplete and aborted ones).
    pub fn progress(&self) -> Vec<Progress> {
        self.shared.lock().progress.clone()
    }

    /// `(target, first_body_byte_at, bytes_received, complete)` for every request seen.
    pub fn first_chunk_times(&self) -> Vec<(Option<String>, Option<Instant>, usize, bool)> {
        self.progress()
            .into_iter()
            .map(|p| {
                (
                    p.target,
                    p.first_body_byte_at,
                    p.bytes_received,
                    p.complete_at.is_some(),
                )
            })
            .collect()
    }

    /// Sleep this long before answering each request (after recording it and running the hook).
    pub fn set_delay(&self, delay: Duration) {
        self.shared.lock().delay = delay;
    }

    pub fn set_hook(&self, hook: Hook) {
        self.shared.lock().hook = Some(hook);
    }

    pub fn clear_hook(&self) {
        self.shared.lock().hook = None;
    }

    /// Answer every correctly signed request with this status and body (sent verbatim, with
    /// the usual Content-Type and x-amzn-RequestId). Requests that fail verification still
    /// get the 403.
    pub fn set_status_override(&self, status: Option<(u16, String)>) {
        self.shared.lock().status_override = status;
    }

    /// Wait until at least `n` requests are recorded; returns them (panics on timeout).
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        let deadline = Instant::now() + timeout;
        loop {
            let reqs = self.requests();
            if reqs.len() >= n {
                return reqs;
            }
            if Instant::now() >= deadline {
                panic!(
                    "fake KMS: expected {n} requests within {timeout:?}, got {}",
                    reqs.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Wait until some request's body progress satisfies `pred`; `None` on timeout.
    pub async fn wait_for_progress(
        &self,
        timeout: Duration,
        pred: impl Fn(&Progress) -> bool,
    ) -> Option<Progress> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.progress().into_iter().find(|p| pred(p)) {
                return Some(p);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stop the server and wait until the listener and every connection are closed.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for FakeKms {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Serves HTTP/1.1 and HTTP/2 (detected from the first bytes) on one connection.
async fn serve_connection<I>(io: I, shared: Arc<Shared>, peer: SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| handle(shared.clone(), peer, req));
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let _ = builder.serve_connection(TokioIo::new(io), svc).await;
}

type Answer = Response<Full<Bytes>>;

async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Answer, Infallible> {
    let head_received_at = Instant::now();
    let (parts, mut body) = req.into_parts();
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let seq = {
        let mut st = shared.lock();
        let seq = st.next_seq;
        st.next_seq += 1;
        st.progress.push(Progress {
            seq,
            target: target.clone(),
            head_received_at,
            first_body_byte_at: None,
            bytes_received: 0,
            complete_at: None,
            error: None,
        });
        seq
    };

    let mut buf = BytesMut::new();
    let mut first_body_byte_at = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    if data.is_empty() {
                        continue;
                    }
                    let now = Instant::now();
                    first_body_byte_at.get_or_insert(now);
                    buf.extend_from_slice(&data);
                    let total = buf.len();
                    shared.update_progress(seq, |p| {
                        p.first_body_byte_at.get_or_insert(now);
                        p.bytes_received = total;
                    });
                }
            }
            Err(e) => {
                let msg = e.to_string();
                shared.update_progress(seq, |p| p.error = Some(msg.clone()));
                return Ok(json_response(
                    400,
                    &json!({"__type": "SerializationException", "message": format!("body read failed: {msg}")}),
                ));
            }
        }
    }
    let body = buf.freeze();
    let received_at = Instant::now();
    shared.update_progress(seq, |p| p.complete_at = Some(received_at));

    let verify_headers = sigv4::headers_with_host(&parts.headers, &parts.uri);
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    // Over h2 a signer may have signed `:authority` itself (NodeHttp2Handler does): its
    // canonical value is the pseudo-header as received. HTTP/1.x has none.
    let authority = match parts.version {
        Version::HTTP_2 => parts.uri.authority().map(|a| a.as_str()),
        _ => None,
    };
    let signature = sigv4::verify_h2(
        parts.method.as_str(),
        path_and_query,
        &verify_headers,
        authority,
        &body,
        super::secret_for,
    );

    let recorded = Recorded {
        seq,
        peer,
        method: parts.method,
        uri: parts.uri,
        version: parts.version,
        headers: parts.headers,
        body,
        target,
        signature,
        head_received_at,
        first_body_byte_at,
        received_at,
    };
    let (hook, delay, status_override) = {
        let mut st = shared.lock();
        st.requests.push(recorded.clone());
        (st.hook.clone(), st.delay, st.status_override.clone())
    };
    if let Some(hook) = hook {
        hook(&recorded);
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let answer = match &recorded.signature {
        Err(msg) => json_response(
            403,
            &json!({"__type": "InvalidSignatureException", "message": msg}),
        ),
        Ok(cred) => match status_override {
            Some((status, body)) => response(status, Bytes::from(body)),
            None => json_response(200, &operation_answer(&recorded, &cred.region)),
        },
    };
    Ok(answer)
}

fn response(status: u16, body: Bytes) -> Answer {
    Response::builder()
        .status(StatusCode::from_u16(status).expect("valid status"))
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-requestid", request_id())
        .body(Full::new(body))
        .expect("response")
}

fn json_response(status: u16, body: &Value) -> Answer {
    response(status, Bytes::from(body.to_string()))
}

/// A fresh UUID-looking request id.
pub fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn key_arn(region: &str, key_id: &str) -> String {
    if key_id.starts_with("arn:") {
        key_id.to_string()
    } else if key_id.starts_with("alias/") || key_id.is_empty() {
        format!("arn:aws:kms:{region}:{ACCOUNT_ID}:key/{DEFAULT_KEY_ID}")
    } else {
        format!("arn:aws:kms:{region}:{ACCOUNT_ID}:key/{key_id}")
    }
}

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as f64 / 1000.0)
        .unwrap_or(0.0)
}

fn key_metadata(region: &str, key_id: &str, req: &Value) -> Value {
    let key_spec = req["KeySpec"].as_str().unwrap_or("SYMMETRIC_DEFAULT");
    json!({
        "AWSAccountId": ACCOUNT_ID,
        "KeyId": key_id,
        "Arn": key_arn(region, key_id),
        "CreationDate": now_epoch(),
        "Enabled": true,
        "Description": req["Description"].as_str().unwrap_or(""),
        "KeyUsage": req["KeyUsage"].as_str().unwrap_or("ENCRYPT_DECRYPT"),
        "KeyState": "Enabled",
        "Origin": req["Origin"].as_str().unwrap_or("AWS_KMS"),
        "KeyManager": "CUSTOMER",
        "CustomerMasterKeySpec": key_spec,
        "KeySpec": key_spec,
        "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
        "MultiRegion": req["MultiRegion"].as_bool().unwrap_or(false),
    })
}

/// The JSON body KMS would answer for this (correctly signed) request.
fn operation_answer(rec: &Recorded, region: &str) -> Value {
    let req: Value = serde_json::from_slice(&rec.body).unwrap_or_else(|_| json!({}));
    let key_id = req["KeyId"].as_str().unwrap_or(DEFAULT_KEY_ID);
    let arn = key_arn(region, key_id);
    match rec.operation().unwrap_or("") {
        "Encrypt" => {
            let plaintext =
                base64_decode(req["Plaintext"].as_str().unwrap_or("")).unwrap_or_default();
            let mut blob = CIPHERTEXT_PREFIX.to_vec();
            blob.extend_from_slice(&plaintext);
            json!({
                "CiphertextBlob": base64_encode(&blob),
                "KeyId": arn,
                "EncryptionAlgorithm": req["EncryptionAlgorithm"].as_str().unwrap_or("SYMMETRIC_DEFAULT"),
            })
        }
        "Decrypt" => {
            let blob =
                base64_decode(req["CiphertextBlob"].as_str().unwrap_or("")).unwrap_or_default();
            let plaintext = blob
                .strip_prefix(CIPHERTEXT_PREFIX)
                .map(<[u8]>::to_vec)
                .unwrap_or_else(|| b"fake-plaintext".to_vec());
            json!({
                "Plaintext": base64_encode(&plaintext),
                "KeyId": arn,
                "EncryptionAlgorithm": req["EncryptionAlgorithm"].as_str().unwrap_or("SYMMETRIC_DEFAULT"),
            })
        }
        "GenerateDataKey" => {
            let len = match req["KeySpec"].as_str() {
                Some("AES_128") => 16,
                _ => req["NumberOfBytes"].as_u64().unwrap_or(32) as usize,
            };
            let plaintext: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut blob = CIPHERTEXT_PREFIX.to_vec();
            blob.extend_from_slice(&plaintext);
            json!({
                "CiphertextBlob": base64_encode(&blob),
                "Plaintext": base64_encode(&plaintext),
                "KeyId": arn,
            })
        }
        "ListKeys" => json!({
            "Keys": [{"KeyId": DEFAULT_KEY_ID, "KeyArn": key_arn(region, DEFAULT_KEY_ID)}],
            "Truncated": false,
        }),
        "CreateKey" => json!({"KeyMetadata": key_metadata(region, &request_id(), &req)}),
        "DescribeKey" => json!({"KeyMetadata": key_metadata(region, key_id, &req)}),
        "ReplicateKey" => {
            let replica_region = req["ReplicaRegion"].as_str().unwrap_or("us-west-2");
            let replica_id = arn.rsplit('/').next().unwrap_or(DEFAULT_KEY_ID).to_string();
            let mut meta = key_metadata(replica_region, &replica_id, &req);
            meta["MultiRegion"] = json!(true);
            json!({
                "ReplicaKeyMetadata": meta,
                "ReplicaPolicy": req["Policy"].as_str().unwrap_or(
                    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111122223333:root"},"Action":"kms:*","Resource":"*"}]}"#,
                ),
                "ReplicaTags": req.get("Tags").cloned().unwrap_or_else(|| json!([])),
            })
        }
        // TagResource, UntagResource and everything else: an empty object.
        _ => json!({}),
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 (padding optional); `None` on invalid input.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = B64.iter().position(|&b| b == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}
