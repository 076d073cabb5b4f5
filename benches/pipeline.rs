//! Micro-benchmarks of the request pipeline (issue #5, part 2).
//!
//! - `decide/*`: classify + head checks + strict parse + policy for a typical two-tag TagResource,
//!   exactly what `kms-tag-guard test` and the proxy's inspect path run, without a network; once
//!   against the built-in policy and once against a generated policy of 50 rules.
//! - `parse_tag_request`, `classify/*`, `evaluate/*`: the steps alone.
//! - `round_trip/*`: one keep-alive request at a time, in process: directly to a trivial hyper
//!   upstream, and through a running kms-tag-guard in front of it (Encrypt passes through,
//!   TagResource is inspected and audited to a file). The difference is the proxy's per-request
//!   cost in latency, printed at the end as `pass-through overhead`.
//!
//! `cargo bench --bench pipeline`; a name filter runs a subset (`cargo bench --bench pipeline --
//! decide`). The requests are the ones `bench/compare` sends with wrk.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kms_tag_guard::cases::{decide, load_cases, Case};
use kms_tag_guard::config::{Config, ConfigSource};
use kms_tag_guard::kms::classify::classify;
use kms_tag_guard::kms::request::parse_tag_request;
use kms_tag_guard::kms::TagOperation;
use kms_tag_guard::policy::Context;

const HOST: &str = "kms.us-east-1.amazonaws.com";
const AUTHORIZATION: &str = "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20261128/us-east-1/kms/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";
const AMZ_DATE: &str = "20261128T120000Z";
/// ~100 bytes of base64 plaintext, as in bench/compare.
const ENCRYPT_BODY: &str = r#"{"KeyId":"arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab","Plaintext":"QmVuY2htYXJrIHBsYWludGV4dCBmb3Iga21zLXRhZy1ndWFyZDogNzUgYnl0ZXMsIGFib3V0IGEgZGF0YSBrZXkgaW4gc2l6ZSE="}"#;
/// Two tags the built-in policy allows (org-prefix, cost-center), as in bench/compare.
/// A CreateAlias as the SDKs send it (a key ARN as the target).
const ALIAS_BODY: &str = r#"{"AliasName":"alias/team-payments-ledger","TargetKeyId":"arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"}"#;
const TAG_BODY: &str = r#"{"KeyId":"arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab","Tags":[{"TagKey":"team:owner","TagValue":"payments"},{"TagKey":"cost:center","TagValue":"4711"}]}"#;
/// The fixed answers of the stand-in upstream.
const ENCRYPT_ANSWER: &str = r#"{"CiphertextBlob":"AQICAHhVd2bEhW0OdXAPr3MnzCm4Pn0sC8hULqxJpSRpXg2crgHh4DnvN8zUE9kwmwzKYHj8AAAAfjB8BgkqhkiG9w0BBwagbzBtAgEAMGgGCSqGSIb3DQEHATAeBglghkgBZQMEAS4wEQQM7hFPuGmb8rLJvnJqAgEQgDtQm1QGXmbiZzU5mqXoLOyDbc9j7JjRcqbFn9Bx0Gd0Z5pqMZVXlb8bI8uYd2Sc2Z6gS7Uz4Y4lbWmTUg==","EncryptionAlgorithm":"SYMMETRIC_DEFAULT","KeyId":"arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"}"#;

/// The head an SDK sends (minus Content-Length, which the client adds).
fn sdk_headers(target: &str) -> Vec<(&'static str, String)> {
    vec![
        ("host", HOST.into()),
        ("content-type", "application/x-amz-json-1.1".into()),
        ("x-amz-target", format!("TrentService.{target}")),
        ("x-amz-date", AMZ_DATE.into()),
        ("authorization", AUTHORIZATION.into()),
        (
            "user-agent",
            "aws-sdk-rust/1.0 os/linux lang/rust/1.85".into(),
        ),
        (
            "amz-sdk-invocation-id",
            "5f6d27c3-6e61-4a5b-9c1d-8a0f1b2c3d4e".into(),
        ),
        ("amz-sdk-request", "attempt=1; max=3".into()),
    ]
}

fn header_map(target: &str, body_len: usize) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in sdk_headers(target) {
        headers.append(
            HeaderName::from_static(name),
            HeaderValue::from_str(&value).unwrap(),
        );
    }
    headers.insert("content-length", HeaderValue::from(body_len));
    headers
}

/// A policy test case for the two-tag TagResource, with the SDK's head.
fn tag_case(dir: &std::path::Path) -> Case {
    let headers: Vec<String> = sdk_headers("TagResource")
        .into_iter()
        .filter(|(name, _)| *name != "x-amz-target")
        .map(|(name, value)| format!("[{name:?}, {value:?}]"))
        .collect();
    let text = format!(
        "[[case]]\nname = \"two allowed tags\"\noperation = \"TagResource\"\nbody = '{TAG_BODY}'\nheaders = [{}]\nexpect = \"allow\"\n",
        headers.join(", ")
    );
    let path = dir.join("bench-cases.toml");
    std::fs::write(&path, text).unwrap();
    let mut cases = load_cases(&path).unwrap();
    assert_eq!(cases.len(), 1);
    cases.remove(0)
}

/// A policy of 50 rules of all four types, none of which the two-tag request breaks; about half
/// of them look at each tag.
fn policy_of_50_rules() -> String {
    let mut text = String::from("[policy]\nmode = \"enforce\"\n");
    for i in 0..50 {
        text.push_str("\n[[policy.rule]]\n");
        text.push_str(&format!("id = \"rule-{i}\"\n"));
        match i % 5 {
            0 => text.push_str(&format!(
                "type = \"required-prefix\"\nprefixes = [\"team:\", \"app:\", \"cost:\", \"unit{i}:\"]\nexempt_keys = [\"Name\"]\n"
            )),
            1 => text.push_str(&format!(
                "type = \"forbidden-key\"\nkeys = [\"Project{i}\", \"Environment{i}\", \"Owner{i}\"]\npatterns = [\"^abac{i}[-:]\"]\non = [\"set\", \"remove\"]\n"
            )),
            2 => text.push_str(&format!(
                "type = \"value-pattern\"\nkey = \"cost:center\"\npattern = \"^[0-9]{{4}}$\"\nexempt_principals = [\"AKIDEXEMPT{i:04}\"]\n"
            )),
            3 => text.push_str(&format!(
                "type = \"value-pattern\"\nkey_pattern = \"^team:\"\npattern = \"^[a-z][a-z0-9-]{{0,62}}$\"\nkey_ids = [\"arn:aws:kms:*:111122223333:key/*\"]\nmode = \"{}\"\n",
                if i % 2 == 0 { "dry-run" } else { "enforce" }
            )),
            _ => text.push_str(&format!(
                "type = \"value-pattern\"\nkey = \"app:classification{i}\"\nallowed = [\"public\", \"internal\", \"confidential\", \"restricted\"]\n"
            )),
        }
    }
    text
}

fn decide_benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let case = tag_case(dir.path());
    let default = Config::built_in().unwrap();
    let fifty = Config::parse(&policy_of_50_rules(), ConfigSource::BuiltIn).unwrap();
    assert_eq!(fifty.policy.rule_count(), 50);
    for (name, config) in [("default_policy", &default), ("policy_of_50_rules", &fifty)] {
        let decision = decide(config, &case);
        assert!(decision.allowed(), "{name}: {decision:?}");
        assert!(
            decision.dry_run_violations.is_empty(),
            "{name}: {decision:?}"
        );
    }

    let mut group = c.benchmark_group("decide");
    group.bench_function("TagResource_two_tags/default_policy", |b| {
        b.iter(|| decide(black_box(&default), black_box(&case)))
    });
    group.bench_function("TagResource_two_tags/policy_of_50_rules", |b| {
        b.iter(|| decide(black_box(&fifty), black_box(&case)))
    });
    group.finish();

    c.bench_function("parse_tag_request/TagResource_two_tags", |b| {
        b.iter(|| parse_tag_request(TagOperation::TagResource, black_box(TAG_BODY.as_bytes())))
    });
    c.bench_function("parse_tag_request/CreateAlias", |b| {
        b.iter(|| parse_tag_request(TagOperation::CreateAlias, black_box(ALIAS_BODY.as_bytes())))
    });

    let mut group = c.benchmark_group("classify");
    let encrypt = header_map("Encrypt", ENCRYPT_BODY.len());
    let tag = header_map("TagResource", TAG_BODY.len());
    let (post, root) = (Method::POST, Uri::from_static("/"));
    group.bench_function("Encrypt", |b| {
        b.iter(|| classify(&post, &root, black_box(&encrypt)))
    });
    group.bench_function("TagResource", |b| {
        b.iter(|| classify(&post, &root, black_box(&tag)))
    });
    group.finish();

    let change = parse_tag_request(TagOperation::TagResource, TAG_BODY.as_bytes()).unwrap();
    let context = Context {
        access_key_id: Some("AKIAIOSFODNN7EXAMPLE"),
        caller: None,
    };
    let mut group = c.benchmark_group("evaluate");
    for (name, config) in [("default_policy", &default), ("policy_of_50_rules", &fifty)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                config
                    .policy
                    .evaluate(black_box(&change), black_box(&context))
            })
        });
    }
    group.finish();
}

/// A trivial upstream: every request gets the fixed Encrypt answer (or `{}` for other targets).
async fn start_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: Request<hyper::body::Incoming>| async move {
                        let encrypt = request
                            .headers()
                            .get("x-amz-target")
                            .is_some_and(|t| t.as_bytes() == b"TrentService.Encrypt");
                        // Read the request body whole, as KMS does.
                        let _ = request.into_body().collect().await;
                        let body = if encrypt { ENCRYPT_ANSWER } else { "{}" };
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/x-amz-json-1.1")
                                .header("x-amzn-requestid", "0d5a8a1b-3a6c-4e7b-9f3e-2c1d0b9a8f7e")
                                .body(Full::new(Bytes::from_static(body.as_bytes())))
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

type BenchClient = Client<HttpConnector, Full<Bytes>>;

fn request(addr: SocketAddr, target: &str, body: &'static str) -> Request<Full<Bytes>> {
    let mut builder = Request::post(format!("http://{addr}/"));
    for (name, value) in sdk_headers(target) {
        builder = builder.header(name, value);
    }
    builder
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn round_trip(client: &BenchClient, addr: SocketAddr, target: &str, body: &'static str) {
    let response = client.request(request(addr, target, body)).await.unwrap();
    assert_eq!(response.status(), 200);
    black_box(response.into_body().collect().await.unwrap().to_bytes());
}

async fn timed(
    client: &BenchClient,
    addr: SocketAddr,
    target: &str,
    body: &'static str,
    n: u64,
) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        round_trip(client, addr, target, body).await;
    }
    start.elapsed()
}

fn round_trip_benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let (upstream, proxy, client) = runtime.block_on(async {
        let upstream = start_upstream().await;
        let config = format!(
            "[listener]\naddress = \"127.0.0.1:0\"\n[admin]\naddress = \"\"\n[upstream]\nendpoint = \"http://{upstream}\"\n[audit]\npath = {:?}\n{}",
            audit.display(),
            // The built-in policy, rules and all.
            &kms_tag_guard::config::DEFAULT_CONFIG[kms_tag_guard::config::DEFAULT_CONFIG
                .find("[policy]")
                .unwrap()..]
        );
        let config = Config::parse(&config, ConfigSource::BuiltIn).unwrap();
        let proxy = kms_tag_guard::start(config).await.unwrap();
        let client: BenchClient = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build_http();
        (upstream, proxy, client)
    });
    let through = proxy.local_addr();

    let mut group = c.benchmark_group("round_trip");
    let cases: [(&str, SocketAddr, &str, &'static str); 4] = [
        ("Encrypt/direct", upstream, "Encrypt", ENCRYPT_BODY),
        ("Encrypt/through_proxy", through, "Encrypt", ENCRYPT_BODY),
        ("TagResource/direct", upstream, "TagResource", TAG_BODY),
        (
            "TagResource/through_proxy",
            through,
            "TagResource",
            TAG_BODY,
        ),
    ];
    for (name, addr, target, body) in cases {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| runtime.block_on(timed(&client, addr, target, body, iters)))
        });
    }
    group.finish();

    // Criterion reports each figure alone; the overhead is their difference. Measured here
    // directly, interleaved in batches so that drift hits both alike.
    if bench_mode() && criterion_filter_matches("round_trip") {
        for (target, body) in [("Encrypt", ENCRYPT_BODY), ("TagResource", TAG_BODY)] {
            let (mut direct, mut proxied) = (Vec::new(), Vec::new());
            runtime.block_on(async {
                for _ in 0..15 {
                    let n = 2000;
                    direct.push(
                        timed(&client, upstream, target, body, n)
                            .await
                            .as_secs_f64()
                            / n as f64,
                    );
                    proxied.push(
                        timed(&client, through, target, body, n).await.as_secs_f64() / n as f64,
                    );
                }
            });
            let (d, p) = (median(&mut direct), median(&mut proxied));
            println!(
                "{} overhead: {:.1} µs per request ({:.1} µs through the proxy, {:.1} µs direct; median of 15 interleaved batches of 2000)",
                if target == "Encrypt" { "pass-through" } else { "inspect" },
                (p - d) * 1e6,
                p * 1e6,
                d * 1e6
            );
        }
    }
    proxy.shutdown();
    drop(runtime);
}

/// Whether this is `cargo bench` (criterion's `--bench`), not a test-mode run of the benches.
fn bench_mode() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Whether a name filter on the command line (`cargo bench -- FILTER`) lets `name` run.
fn criterion_filter_matches(name: &str) -> bool {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    filters.is_empty()
        || filters
            .iter()
            .any(|f| name.contains(f.as_str()) || f.contains(name))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = decide_benches, round_trip_benches
}
criterion_main!(benches);
