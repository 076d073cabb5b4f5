//! From a tag-bearing request's bytes to a decision: credential, strict parse, policy.
//!
//! Shared by the proxy and by `kms-tag-guard test`, so a policy test case is judged by exactly the
//! code that judges live traffic.

use std::net::SocketAddr;

use http::HeaderMap;

use crate::kms::credential::read_credential;
use crate::kms::protocol::check_body;
use crate::kms::request::parse_tag_request;
use crate::kms::{Credential, TagChange, TagOperation};
use crate::policy::{Context, Decision, Policy};

/// What the proxy made of one tag-bearing request.
#[derive(Debug, Clone)]
pub struct Judgement {
    /// `None` when the request could not be read.
    pub change: Option<TagChange>,
    pub credential: Option<Credential>,
    /// The `KeyId` the request names: the parsed one, or, for a body refused as unreadable, the
    /// `KeyId` member a plain JSON reading finds (for the record only).
    pub key_id: Option<String>,
    /// Which SDK call the request is an attempt of, when the SDK says so.
    pub call: SdkCall,
    pub decision: Decision,
}

/// The SDK's invocation id (`amz-sdk-invocation-id`, the same for every retry of one call) and
/// attempt number (`amz-sdk-request: attempt=N; max=M`), so the retries of one call can be
/// grouped in the audit log. Only short, printable values are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SdkCall {
    pub invocation_id: Option<String>,
    pub attempt: Option<u32>,
}

impl SdkCall {
    pub fn read(headers: &HeaderMap) -> SdkCall {
        let invocation_id = headers
            .get("amz-sdk-invocation-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 64)
            .filter(|v| v.bytes().all(|b| b.is_ascii_graphic()))
            .map(str::to_owned);
        let attempt = headers
            .get("amz-sdk-request")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.split(';')
                    .filter_map(|p| p.trim().strip_prefix("attempt="))
                    .next()
                    .and_then(|n| n.parse().ok())
            });
        SdkCall {
            invocation_id,
            attempt,
        }
    }
}

impl Judgement {
    /// A request refused before its change could be read.
    pub fn unreadable(reason: impl std::fmt::Display) -> Judgement {
        Judgement {
            change: None,
            credential: None,
            key_id: None,
            call: SdkCall::default(),
            decision: Decision::unreadable(reason.to_string()),
        }
    }

    /// Adds what the head says about the request's sender (credential scope, SDK call), for the
    /// record of a request refused before or while its body was read. A credential that cannot
    /// be read is left out.
    pub fn about(mut self, headers: &HeaderMap, query: Option<&str>) -> Judgement {
        if self.credential.is_none() {
            self.credential = read_credential(headers, query).ok().flatten();
        }
        self.call = SdkCall::read(headers);
        self
    }
}

/// Judges a tag-bearing request whose head already passed `classify` and `check_tag_request_head`.
pub fn judge(
    operation: TagOperation,
    headers: &HeaderMap,
    query: Option<&str>,
    body: &[u8],
    policy: &Policy,
    source: Option<SocketAddr>,
) -> Judgement {
    let call = SdkCall::read(headers);
    let credential = match read_credential(headers, query) {
        Ok(c) => c,
        Err(e) => {
            return Judgement {
                key_id: claimed_key_id(body),
                call,
                ..Judgement::unreadable(e)
            }
        }
    };
    // The body must be one protocol's before its JSON is read (an `Action=` form parameter in a
    // string value would be another operation to some readers).
    let parsed = check_body(body)
        .map_err(|e| e.to_string())
        .and_then(|()| parse_tag_request(operation, body).map_err(|e| e.to_string()));
    let change = match parsed {
        Ok(c) => c,
        Err(e) => {
            return Judgement {
                credential,
                key_id: claimed_key_id(body),
                call,
                ..Judgement::unreadable(e)
            }
        }
    };
    let context = Context {
        access_key_id: credential.as_ref().map(|c| c.access_key_id.as_str()),
        region: credential.as_ref().and_then(|c| c.region.as_deref()),
        source,
    };
    let decision = policy.evaluate(&change, &context);
    Judgement {
        key_id: change.key_id.clone(),
        change: Some(change),
        credential,
        call,
        decision,
    }
}

/// The string `KeyId` member of a body that is a JSON object, however the strict parser judged
/// it: what the refused request said it was about. At most 2048 bytes (the model's limit).
fn claimed_key_id(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let key_id = value.get("KeyId")?.as_str()?;
    (key_id.len() <= 2048).then(|| key_id.to_owned())
}
