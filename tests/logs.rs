//! Nothing secret reaches the logs (contract section 5: "Never logged: the signature,
//! `X-Amz-Security-Token`, any body of a non-tag-bearing request"). The real binary runs as a
//! child with `RUST_LOG=trace` (text) and with `--log-format json` at `debug`, its standard
//! output (the audit log) and standard error captured to files; a full workload goes through it;
//! then both files are searched for the secret access key, the session token, every signature
//! sent, and the plaintexts and ciphertexts of the Encrypt/Decrypt/GenerateDataKey bodies.

mod common;

use std::sync::{Arc, Mutex};

use aws_sdk_kms::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_kms::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use common::child::{start_child, ChildOptions, ChildProxy};
use common::fake_kms::base64_encode;
use common::raw::{self, RawRequest};
use common::*;

const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
/// Recognisable secrets: any of them in a log is a leak.
const SESSION_TOKEN: &str = "SessionTokenLeakCanary/kms-tag-guard/7f3a9c1e5b2d4086";
const PLAINTEXT: &str = "PlaintextLeakCanary-kms-tag-guard-4b1d9e";
const H2_PLAINTEXT: &str = "H2PlaintextLeakCanary-kms-tag-guard-c0ffee";
const RAW_PLAINTEXT: &str = "RawPlaintextLeakCanary-kms-tag-guard-5eed";

/// Records the `Authorization` header of every request the SDK sends (retries included), so
/// the signatures of requests that never reached the fake (the 502s) are searched for too.
#[derive(Debug, Default, Clone)]
struct CaptureAuthorization(Arc<Mutex<Vec<String>>>);

impl Intercept for CaptureAuthorization {
    fn name(&self) -> &'static str {
        "CaptureAuthorization"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if let Some(auth) = context.request().headers().get("authorization") {
            self.0.lock().unwrap().push(auth.to_owned());
        }
        Ok(())
    }
}

/// The hex signature of an `Authorization: AWS4-HMAC-SHA256 ..., Signature=<hex>` value.
fn signature_of(authorization: &str) -> String {
    let at = authorization
        .find("Signature=")
        .unwrap_or_else(|| panic!("no Signature= in {authorization:?}"));
    authorization[at + "Signature=".len()..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect()
}

/// What must never appear in a log: `(what, text)`.
type Needles = Vec<(String, String)>;

/// Drives every kind of request through the proxy; returns the secrets it used. Shuts the fake
/// down part way, for the 502s.
async fn workload(fake: FakeKms, proxy: &ChildProxy) -> Needles {
    let mut needles: Needles = vec![
        ("the secret access key".into(), SECRET_KEY.into()),
        ("the session token".into(), SESSION_TOKEN.into()),
        ("the Encrypt plaintext".into(), PLAINTEXT.into()),
        ("the h2 Encrypt plaintext".into(), H2_PLAINTEXT.into()),
        ("the raw Encrypt plaintext".into(), RAW_PLAINTEXT.into()),
    ];
    let capture = CaptureAuthorization::default();
    let base = kms_client_opts(
        &proxy.url(),
        ClientOptions {
            session_token: Some(SESSION_TOKEN.into()),
            ..ClientOptions::default()
        },
    );
    let kms = aws_sdk_kms::Client::from_conf(
        base.config()
            .to_builder()
            .interceptor(capture.clone())
            .build(),
    );
    let host = fake.host();

    // Pass-through operations with secret bodies.
    let encrypted = kms
        .encrypt()
        .key_id(KEY)
        .plaintext(Blob::new(PLAINTEXT.as_bytes().to_vec()))
        .send()
        .await
        .expect("Encrypt");
    let ciphertext = encrypted.ciphertext_blob().expect("ciphertext").clone();
    let decrypted = kms
        .decrypt()
        .ciphertext_blob(ciphertext.clone())
        .send()
        .await
        .expect("Decrypt");
    assert_eq!(
        decrypted.plaintext().unwrap().as_ref(),
        PLAINTEXT.as_bytes()
    );
    let data_key = kms
        .generate_data_key()
        .key_id(KEY)
        .key_spec(DataKeySpec::Aes256)
        .send()
        .await
        .expect("GenerateDataKey");
    needles.push((
        "the Encrypt plaintext (base64)".into(),
        base64_encode(PLAINTEXT.as_bytes()),
    ));
    needles.push((
        "the ciphertext (base64)".into(),
        base64_encode(ciphertext.as_ref()),
    ));
    needles.push((
        "the data key plaintext (base64)".into(),
        base64_encode(data_key.plaintext().unwrap().as_ref()),
    ));
    needles.push((
        "the data key ciphertext (base64)".into(),
        base64_encode(data_key.ciphertext_blob().unwrap().as_ref()),
    ));

    // Tag changes: one allowed, one denied.
    kms.tag_resource()
        .key_id(KEY)
        .tags(tag("team:owner", "payments"))
        .send()
        .await
        .expect("allowed TagResource");
    let denied = kms
        .tag_resource()
        .key_id(KEY)
        .tags(tag("Project", "apollo"))
        .send()
        .await
        .expect_err("TagResource with an ABAC key is denied");
    assert_eq!(
        denied.raw_response().map(|r| r.status().as_u16()),
        Some(400),
        "{}",
        error_chain(&denied)
    );

    // Unreadable requests, raw, carrying the token: a tag change with two Tags members (audited
    // deny), and an Encrypt with two Content-Type headers (refused, not audited).
    let dup_tags = format!(
        r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:owner","TagValue":"a"}}],"Tags":[{{"TagKey":"Project","TagValue":"b"}}]}}"#
    );
    let mut unreadable_tag =
        RawRequest::signed_kms(&host, "TrentService.TagResource", dup_tags.as_bytes());
    unreadable_tag.add_header("X-Amz-Security-Token", SESSION_TOKEN);
    let enc_body = format!(
        r#"{{"KeyId":"{KEY}","Plaintext":"{}"}}"#,
        base64_encode(RAW_PLAINTEXT.as_bytes())
    );
    needles.push((
        "the raw Encrypt plaintext (base64)".into(),
        base64_encode(RAW_PLAINTEXT.as_bytes()),
    ));
    let mut ambiguous_encrypt =
        RawRequest::signed_kms(&host, "TrentService.Encrypt", enc_body.as_bytes());
    ambiguous_encrypt
        .add_header("Content-Type", "application/x-amz-json-1.1")
        .add_header("X-Amz-Security-Token", SESSION_TOKEN);
    for (what, request) in [
        ("a TagResource with two Tags members", &unreadable_tag),
        (
            "an Encrypt with two Content-Type headers",
            &ambiguous_encrypt,
        ),
    ] {
        let response = raw::send(proxy.addr, &request.to_bytes()).await;
        assert_eq!(response.status, 400, "{what}: {}", response.body_str());
        let auth = request.header("Authorization").unwrap();
        needles.push((format!("the signature of {what}"), signature_of(auth)));
    }

    // Refusals that would copy request text into a message, an audit record or a log line:
    // a presigned-style query (token and credential), userinfo in Host, a malformed head
    // carrying the token. Each is refused; none may copy the secret.
    let presigned_akid = "AKIDPRESIGNEDLEAK01";
    needles.push(("the presigned access key id".into(), presigned_akid.into()));
    let mut presigned =
        RawRequest::signed_kms(&host, "TrentService.TagResource", dup_tags.as_bytes());
    presigned.target = format!(
        "/?X-Amz-Credential={presigned_akid}%2F20260101%2Fus-east-1%2Fkms%2Faws4_request&X-Amz-Security-Token={}",
        SESSION_TOKEN.replace('/', "%2F")
    );
    needles.push((
        "the session token, percent-encoded".into(),
        SESSION_TOKEN.replace('/', "%2F"),
    ));
    let mut userinfo = RawRequest::signed_kms(&host, "TrentService.Encrypt", enc_body.as_bytes());
    userinfo.set_header("Host", &format!("{presigned_akid}:{SESSION_TOKEN}@{host}"));
    let mut obs_fold =
        RawRequest::signed_kms(&host, "TrentService.TagResource", dup_tags.as_bytes());
    obs_fold
        .add_header("X-Amz-Security-Token", SESSION_TOKEN)
        .add_header("X-Folded", "a\r\n b");
    for (what, request, status) in [
        ("a presigned-style request line", &presigned, 400),
        ("userinfo in Host", &userinfo, 421),
        ("an obs-folded head", &obs_fold, 400),
    ] {
        let response = raw::send(proxy.addr, &request.to_bytes()).await;
        assert_eq!(response.status, status, "{what}: {}", response.body_str());
        for (_, needle) in &needles {
            assert!(
                !response.body_str().contains(needle.as_str()),
                "{what}: the answer copies a secret: {}",
                response.body_str()
            );
        }
        let auth = request.header("Authorization").unwrap();
        needles.push((format!("the signature of {what}"), signature_of(auth)));
    }

    // A CONNECT whose target carries user information (credentials, to a URL reader).
    let connect = format!(
        "CONNECT {presigned_akid}:{SESSION_TOKEN}@kms.us-east-1.amazonaws.com:443 HTTP/1.1\r\n\
         Host: kms.us-east-1.amazonaws.com:443\r\n\r\n"
    );
    let response = raw::send(proxy.addr, connect.as_bytes()).await;
    assert!(
        (400..500).contains(&response.status),
        "CONNECT with user information: {}",
        response.body_str()
    );
    assert!(
        !response.body_str().contains(SESSION_TOKEN),
        "the CONNECT refusal copies the user information: {}",
        response.body_str()
    );

    // An Encrypt over HTTP/2 (prior knowledge), token and all.
    h2_encrypt(proxy, &host, &mut needles).await;

    // The signatures of everything that reached the fake, as the fake saw them.
    let recorded = fake.requests();
    let operations: Vec<_> = recorded.iter().map(|r| r.operation()).collect();
    assert_eq!(
        operations,
        [
            Some("Encrypt"),
            Some("Decrypt"),
            Some("GenerateDataKey"),
            Some("TagResource"),
            Some("Encrypt")
        ],
        "what reached the fake"
    );
    for r in &recorded {
        let auth = r.header("authorization").expect("authorization");
        needles.push((
            format!("the signature of {:?} (seq {})", r.operation(), r.seq),
            signature_of(auth),
        ));
        if r.operation() != Some("TagResource") {
            // The whole body of a non-tag-bearing request.
            needles.push((
                format!("the body of {:?} (seq {})", r.operation(), r.seq),
                String::from_utf8_lossy(&r.body).into_owned(),
            ));
        }
    }

    // 502s: the upstream is gone.
    fake.shutdown().await;
    for (what, result) in [
        (
            "Encrypt",
            kms.encrypt()
                .key_id(KEY)
                .plaintext(Blob::new(PLAINTEXT.as_bytes().to_vec()))
                .send()
                .await
                .err()
                .map(|e| e.raw_response().map(|r| r.status().as_u16())),
        ),
        (
            "TagResource",
            kms.tag_resource()
                .key_id(KEY)
                .tags(tag("team:owner", "payments"))
                .send()
                .await
                .err()
                .map(|e| e.raw_response().map(|r| r.status().as_u16())),
        ),
    ] {
        assert_eq!(result, Some(Some(502)), "{what} without an upstream");
    }

    let sdk_authorizations = capture.0.lock().unwrap().clone();
    assert!(sdk_authorizations.len() >= 7, "{sdk_authorizations:?}");
    for (i, auth) in sdk_authorizations.iter().enumerate() {
        assert!(
            auth.contains("x-amz-security-token"),
            "the SDK did not sign the token: {auth}"
        );
        needles.push((
            format!("the signature of SDK request {i}"),
            signature_of(auth),
        ));
    }
    needles
}

async fn h2_encrypt(proxy: &ChildProxy, host: &str, needles: &mut Needles) {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let body = format!(
        r#"{{"KeyId":"{KEY}","Plaintext":"{}"}}"#,
        base64_encode(H2_PLAINTEXT.as_bytes())
    );
    needles.push((
        "the h2 Encrypt plaintext (base64)".into(),
        base64_encode(H2_PLAINTEXT.as_bytes()),
    ));
    let signed = sigv4::sign(
        "POST",
        host,
        "TrentService.Encrypt",
        body.as_bytes(),
        ACCESS_KEY_ID,
        SECRET_KEY,
        REGION,
        None,
    );
    needles.push((
        "the signature of the h2 Encrypt".into(),
        signature_of(&signed.authorization),
    ));
    let request = http::Request::post(format!("http://{host}/"))
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amz-target", "TrentService.Encrypt")
        .header("x-amz-date", &signed.amz_date)
        .header("x-amz-security-token", SESSION_TOKEN)
        .header("authorization", &signed.authorization)
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let answer = response.into_body().collect().await.unwrap().to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    needles.push((
        "the h2 ciphertext (base64)".into(),
        answer["CiphertextBlob"].as_str().unwrap().to_owned(),
    ));
    drop(sender);
    conn.abort();
}

/// Every needle found in `text`, with the line it is on.
fn leaks(stream: &str, text: &str, needles: &Needles) -> Vec<String> {
    let mut found = Vec::new();
    for (what, needle) in needles {
        assert!(
            needle.len() >= 16,
            "{what}: {needle:?} is too short to search for"
        );
        for line in text.lines().filter(|l| l.contains(needle.as_str())) {
            let shown: String = line.chars().take(600).collect();
            found.push(format!("{stream}: {what} in: {shown}"));
        }
    }
    found
}

/// Runs the workload through a child with these logging settings, stops it, and searches its
/// standard output and standard error. Returns the leaks and the two texts.
async fn run(global_args: &[&str], rust_log: &str) -> (Vec<String>, String, String) {
    let fake = FakeKms::start().await;
    let mut opts = ChildOptions::new(&fake.url());
    opts.global_args = global_args.iter().map(|s| s.to_string()).collect();
    opts.rust_log = Some(rust_log.to_owned());
    opts.config.limits = "body_read_timeout_ms = 5000".into();
    let mut proxy = start_child(opts).await;
    let needles = workload(fake, &proxy).await;
    let (status, proxy) = tokio::task::spawn_blocking(move || (proxy.stop(), proxy))
        .await
        .unwrap();
    let (stdout, stderr) = (proxy.stdout(), proxy.stderr());
    assert!(
        status.is_some_and(|s| s.success()),
        "the proxy did not stop cleanly: {status:?}\n{stderr}"
    );
    // The capture worked: the audit log has the tag changes, stderr has the shutdown.
    assert!(
        stdout.contains("\"decision\":\"allow\"") && stdout.contains("\"decision\":\"deny\""),
        "no audit records on standard output:\n{stdout}"
    );
    assert!(stderr.contains("stopped"), "no shutdown log:\n{stderr}");
    let mut found = leaks("stdout (audit)", &stdout, &needles);
    found.extend(leaks("stderr (logs)", &stderr, &needles));
    eprintln!(
        "logs {global_args:?} RUST_LOG={rust_log}: {} needles, stdout {} lines, stderr {} lines, \
         {} leaks",
        needles.len(),
        stdout.lines().count(),
        stderr.lines().count(),
        found.len()
    );
    (found, stdout, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_text_logs_hold_no_signature_token_or_pass_through_body() {
    let (found, _stdout, stderr) = run(&[], "trace").await;
    assert!(
        stderr.lines().any(|l| l.contains(" TRACE ")),
        "no trace lines: is RUST_LOG honoured?\n{stderr}"
    );
    assert!(
        found.is_empty(),
        "secrets in the logs:\n{}",
        found.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_json_logs_hold_no_signature_token_or_pass_through_body() {
    let (found, _stdout, stderr) = run(&["--log-format", "json"], "debug").await;
    assert!(
        stderr.lines().any(|l| l.contains("\"level\":\"DEBUG\"")),
        "no debug lines in JSON: is RUST_LOG honoured?\n{stderr}"
    );
    for line in stderr.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not a JSON log line: {line}"
        );
    }
    assert!(
        found.is_empty(),
        "secrets in the logs:\n{}",
        found.join("\n")
    );
}
