//! moto (<https://github.com/getmoto/moto>) as a second, independent KMS behind the proxy: a
//! `moto_server` child process on an ephemeral loopback port, from a venv under the target
//! directory with the pinned `tests/moto-requirements.txt` (installed on first use; see
//! [`super::deps`]). It keeps real state (keys, tags), so a test can check what a request
//! *did*, not only what reached the upstream.
//!
//! What moto does with a request, which a differential test must keep in mind (moto 5.2.5,
//! `moto/moto_server/werkzeug_app.py` and `moto/core/responses.py`):
//!
//! - **Routing** is by the SigV4 credential scope's service (`.../us-east-1/kms/aws4_request`),
//!   so requests must be SigV4-signed with service `kms` (the signature itself is not checked).
//!   The region is the scope's region.
//! - **The operation** is taken from an `Action` parameter if there is one, and only otherwise
//!   from `X-Amz-Target` (its last `.`-segment: `Anything.TagResource` is TagResource). The
//!   `Action` parameter is looked for in a form body, then in the URL's query string, and then,
//!   when neither had any parameter, in **any body** read as a query string (Python
//!   `parse_qsl`), JSON included: a JSON body holding `&Action=UntagResource&` inside a string
//!   value is an UntagResource to moto.
//! - **Answers:** successful calls come with `Content-Type: text/html` (the body is JSON);
//!   errors are JSON with `__type`.
//!
//! [`Moto::create_key`] and [`Moto::list_tags`] talk to moto directly (signed with the test
//! credentials by [`super::sigv4`]), so a test can set up and inspect state without the proxy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::deps;
use super::raw::{self, RawRequest, RawResponse};

/// The account id moto puts in ARNs unless told otherwise.
pub const MOTO_ACCOUNT_ID: &str = "123456789012";
/// The pinned requirements (moto[server] and its whole dependency closure).
pub const REQUIREMENTS: &str = "tests/moto-requirements.txt";
/// How long moto may take to start answering (it imports a lot on first start).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `moto_server`. Dropping it kills the process.
pub struct Moto {
    child: Option<Child>,
    pub addr: SocketAddr,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Installs moto if needed, starts `moto_server -H 127.0.0.1 -p 0`, reads the port it
    /// reports and waits until it answers a signed `ListKeys` (within [`START_TIMEOUT`]).
    pub async fn start() -> Moto {
        let venv = deps::python_venv("moto-venv", REQUIREMENTS, (3, 10));
        let dir = tempfile::tempdir().expect("temporary directory");
        let log_path = dir.path().join("moto.log");
        let log = std::fs::File::create(&log_path).expect("moto log file");
        let child = Command::new(venv.join("bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", "0"])
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("start {}/bin/moto_server: {e}", venv.display()));
        let mut moto = Moto {
            child: Some(child),
            addr: "127.0.0.1:0".parse().unwrap(),
            log_path,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        moto.addr = loop {
            if let Some(addr) = running_on(&moto.log()) {
                break addr;
            }
            moto.check_alive();
            assert!(
                Instant::now() < deadline,
                "moto_server did not report its port within {START_TIMEOUT:?}:\n{}",
                moto.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        loop {
            let request = moto.signed("ListKeys", &json!({}));
            match raw::try_send(moto.addr, &request.to_bytes()).await {
                Ok(answer) if answer.status == 200 => break,
                Ok(answer) => panic!(
                    "moto answered ListKeys with {}: {}\n{}",
                    answer.status,
                    answer.body_str(),
                    moto.log()
                ),
                Err(_) if Instant::now() < deadline => {
                    moto.check_alive();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!(
                    "moto did not answer within {START_TIMEOUT:?} ({e}):\n{}",
                    moto.log()
                ),
            }
        }
        moto
    }

    /// The venv's Python, which has boto3 (a dependency of moto) for tests that drive the proxy
    /// with the AWS SDK for Python.
    pub fn python() -> PathBuf {
        deps::python_venv("moto-venv", REQUIREMENTS, (3, 10)).join("bin/python")
    }

    /// `http://127.0.0.1:PORT`, for the proxy's `[upstream] endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// What moto printed so far (stdout and stderr, one request line per request).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn check_alive(&mut self) {
        if let Some(child) = &mut self.child {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("moto_server exited ({status}):\n{}", self.log());
            }
        }
    }

    /// A KMS JSON request for moto, signed with the test credentials (service `kms`,
    /// [`super::REGION`], `Host` = moto's address).
    pub fn signed(&self, operation: &str, body: &Value) -> RawRequest {
        RawRequest::signed_kms(
            &self.host(),
            &format!("TrentService.{operation}"),
            body.to_string().as_bytes(),
        )
    }

    /// Sends these bytes, verbatim, on a fresh connection to moto and reads one answer.
    pub async fn send_raw(&self, bytes: &[u8]) -> RawResponse {
        raw::send(self.addr, bytes).await
    }

    /// Calls `operation` directly (signed, see [`Moto::signed`]).
    pub async fn call(&self, operation: &str, body: &Value) -> RawResponse {
        self.send_raw(&self.signed(operation, body).to_bytes())
            .await
    }

    /// Creates a symmetric key with these tags directly in moto; returns its KeyId.
    pub async fn create_key(&self, tags: &[(&str, &str)]) -> String {
        let tags: Vec<Value> = tags
            .iter()
            .map(|(k, v)| json!({"TagKey": k, "TagValue": v}))
            .collect();
        let answer = self
            .call(
                "CreateKey",
                &json!({"Description": "kms-tag-guard test key", "Tags": tags}),
            )
            .await;
        assert_eq!(answer.status, 200, "moto CreateKey: {}", answer.body_str());
        answer.json()["KeyMetadata"]["KeyId"]
            .as_str()
            .unwrap_or_else(|| panic!("no KeyId in {}", answer.body_str()))
            .to_owned()
    }

    /// The key's tags as moto holds them, as `(key, value)` in moto's order.
    pub async fn list_tags(&self, key_id: &str) -> Vec<(String, String)> {
        let answer = self
            .call("ListResourceTags", &json!({"KeyId": key_id, "Limit": 1000}))
            .await;
        assert_eq!(
            answer.status,
            200,
            "moto ListResourceTags: {}",
            answer.body_str()
        );
        let body = answer.json();
        assert_ne!(body["Truncated"], true, "more than 1000 tags: {body}");
        body["Tags"]
            .as_array()
            .unwrap_or_else(|| panic!("no Tags in {body}"))
            .iter()
            .map(|t| {
                (
                    t["TagKey"].as_str().unwrap_or_default().to_owned(),
                    t["TagValue"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The address in werkzeug's ` * Running on http://127.0.0.1:PORT` line.
fn running_on(log: &str) -> Option<SocketAddr> {
    log.lines().find_map(|line| {
        line.trim()
            .strip_prefix("* Running on http://")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}
