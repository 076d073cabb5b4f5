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
    pub decision: Decision,
}

impl Judgement {
    /// A request refused before its change could be read.
    pub fn unreadable(reason: impl std::fmt::Display) -> Judgement {
        Judgement {
            change: None,
            credential: None,
            decision: Decision::unreadable(reason.to_string()),
        }
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
    let credential = match read_credential(headers, query) {
        Ok(c) => c,
        Err(e) => return Judgement::unreadable(e),
    };
    // The body must be one protocol's before its JSON is read (an `Action=` form parameter in a
    // string value would be another operation to some readers).
    if let Err(e) = check_body(body) {
        return Judgement {
            credential,
            ..Judgement::unreadable(e)
        };
    }
    let change = match parse_tag_request(operation, body) {
        Ok(c) => c,
        Err(e) => {
            return Judgement {
                credential,
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
        change: Some(change),
        credential,
        decision,
    }
}
