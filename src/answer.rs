//! Every answer the proxy makes itself, mapped to its KMS-shaped response in one table.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::kms::classify::CONTENT_TYPE as AMZ_JSON;
use crate::kms::Unreadable;
use crate::metrics::Outcome;

/// Why the proxy answered a request itself instead of forwarding it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// A tag change broke the policy; the message names every rule and key.
    #[error("{0}")]
    Denied(String),
    /// The request could not be read unambiguously.
    #[error("kms-tag-guard refused an ambiguous or unreadable request: {0}")]
    Unreadable(String),
    /// An alias change (CreateAlias, UpdateAlias, DeleteAlias) broke the policy; the message
    /// names every rule.
    #[error("{0}")]
    AliasDenied(String),
    /// An alias change that could not be read unambiguously, or whose alias name breaks the
    /// rules of the KMS model.
    #[error("kms-tag-guard refused an ambiguous or unreadable alias request: {0}")]
    AliasUnreadable(String),
    #[error("kms-tag-guard refused the request: {0}; KMS request heads are a few KiB")]
    HeadTooLarge(String),
    #[error("kms-tag-guard refused the request: the body is larger than the {limit} bytes allowed for tag-changing requests ([limits].max_body_bytes)")]
    BodyTooLarge { limit: u64 },
    #[error("kms-tag-guard is holding as many tag-changing request bodies as it may at once ({limit} bytes, [limits].max_buffered_body_bytes), so this tag change was not read or forwarded; retry (operators: raise max_buffered_body_bytes together with the memory limit, docs/security.md)")]
    BodyBudget { limit: u64 },
    #[error("kms-tag-guard stopped waiting for the request body after {0} ms ([limits].body_read_timeout_ms); send the whole body promptly")]
    BodyTimeout(u128),
    #[error("X-Amz-Target \"TrentService.{0}\" is not an operation of the KMS API, and this proxy rejects unknown operations; to forward them, set [policy].unknown_operations = \"forward\"")]
    UnknownOperation(String),
    #[error("the Host {0:?} is not a KMS endpoint this proxy forwards to ([upstream].allowed_hosts); address a KMS host name")]
    HostNotAllowed(String),
    #[error("kms-tag-guard refused the request: {0}")]
    HostNotName(String),
    #[error("the Host {host:?} is not the host this CONNECT tunnel was opened to ({tunnel:?}); send requests for another host through a tunnel of their own")]
    HostNotTunnel { host: String, tunnel: String },
    #[error("kms-tag-guard refused the CONNECT: {0}")]
    ConnectRefused(String),
    #[error("kms-tag-guard could not open the tunnel: {0}; nothing was sent through it, retry")]
    TunnelConnect(String),
    #[error("kms-tag-guard could not write the audit record, so the tag change was not forwarded; retry later (operators: check [audit].path)")]
    AuditUnavailable,
    #[error("kms-tag-guard could not reach KMS: {0}; the request was not sent, retry")]
    UpstreamConnect(String),
    #[error("the exchange with KMS broke off: {0}; KMS may or may not have acted on the request, so check before you retry a change")]
    UpstreamBroken(String),
    #[error("KMS did not answer within {0} ms ([upstream].timeout_ms); retry")]
    UpstreamTimeout(u128),
    #[error("kms-tag-guard shut down before KMS answered (the shutdown grace period, [shutdown].grace_ms, ended); KMS may or may not have applied the change, so check before you retry it")]
    ShutDown,
    #[error("the request's signature covers the HTTP/2 pseudo-header :authority, so only an HTTP/2 request can carry it to KMS, and {0}; nothing was sent. Use the SDK's HTTP/1.1 handler (JavaScript v3: the default NodeHttpHandler instead of NodeHttp2Handler), or point [upstream] at an endpoint that speaks HTTP/2")]
    UpstreamNoH2(String),
}

impl From<Unreadable> for ProxyError {
    /// How a request refused by the KMS wire checks is answered.
    fn from(reason: Unreadable) -> ProxyError {
        match reason {
            Unreadable::HostNotName(_) => ProxyError::HostNotName(reason.to_string()),
            other => ProxyError::Unreadable(other.to_string()),
        }
    }
}

impl ProxyError {
    /// Status, `__type`, and the `x-kms-tag-guard` kind of the response.
    pub fn shape(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ProxyError::Denied(_) => (StatusCode::BAD_REQUEST, "TagException", "deny"),
            ProxyError::Unreadable(_) => (StatusCode::BAD_REQUEST, "TagException", "reject"),
            // The error KMS answers CreateAlias with for a name it refuses.
            ProxyError::AliasDenied(_) => {
                (StatusCode::BAD_REQUEST, "InvalidAliasNameException", "deny")
            }
            ProxyError::AliasUnreadable(_) => (
                StatusCode::BAD_REQUEST,
                "InvalidAliasNameException",
                "reject",
            ),
            ProxyError::BodyTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "TagException", "too-large")
            }
            ProxyError::HeadTooLarge(_) => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "TagException",
                "too-large",
            ),
            ProxyError::BodyTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "RequestTimeoutException",
                "body-timeout",
            ),
            ProxyError::UnknownOperation(_) => (
                StatusCode::BAD_REQUEST,
                "UnknownOperationException",
                "unknown-operation",
            ),
            ProxyError::HostNotAllowed(_)
            | ProxyError::HostNotName(_)
            | ProxyError::HostNotTunnel { .. } => (
                StatusCode::MISDIRECTED_REQUEST,
                "MisdirectedRequest",
                "host-not-allowed",
            ),
            ProxyError::ConnectRefused(_) => {
                (StatusCode::FORBIDDEN, "Forbidden", "connect-refused")
            }
            ProxyError::TunnelConnect(_) => (StatusCode::BAD_GATEWAY, "BadGateway", "tunnel-error"),
            ProxyError::AuditUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "audit-unavailable",
            ),
            ProxyError::BodyBudget { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "body-budget",
            ),
            ProxyError::UpstreamConnect(_) | ProxyError::UpstreamBroken(_) => {
                (StatusCode::BAD_GATEWAY, "BadGateway", "upstream-error")
            }
            ProxyError::UpstreamTimeout(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                "GatewayTimeout",
                "upstream-timeout",
            ),
            ProxyError::ShutDown => (StatusCode::GATEWAY_TIMEOUT, "GatewayTimeout", "shutdown"),
            // A setting of the client's to change, not a failure to retry.
            ProxyError::UpstreamNoH2(_) => (
                StatusCode::BAD_REQUEST,
                "UnsupportedHttpVersion",
                "upstream-no-h2",
            ),
        }
    }

    /// What the metrics call a request answered this way.
    pub fn outcome(&self) -> Outcome {
        match self {
            ProxyError::AuditUnavailable
            | ProxyError::BodyBudget { .. }
            | ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamBroken(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::ShutDown
            | ProxyError::UpstreamNoH2(_)
            | ProxyError::TunnelConnect(_) => Outcome::error,
            _ => Outcome::deny,
        }
    }

    /// The KMS-shaped response: awsJson 1.1 body with `__type` and `message`, the request id, and
    /// `x-kms-tag-guard` so nobody mistakes it for an answer from KMS.
    pub fn into_response(self, request_id: &str) -> Response<Full<Bytes>> {
        let (status, error_type, kind) = self.shape();
        let body = serde_json::json!({ "__type": error_type, "message": self.to_string() });
        let mut response = Response::new(Full::new(Bytes::from(
            serde_json::to_vec(&body).expect("serialisable"),
        )));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(AMZ_JSON));
        headers.insert(
            "x-amzn-requestid",
            HeaderValue::from_str(request_id).expect("uuid is a header value"),
        );
        headers.insert("x-amzn-errortype", HeaderValue::from_static(error_type));
        headers.insert("x-kms-tag-guard", HeaderValue::from_static(kind));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn every_error_has_its_contract_shape() {
        let table = [
            (ProxyError::Denied("d".into()), 400, "TagException"),
            (ProxyError::Unreadable("u".into()), 400, "TagException"),
            (
                ProxyError::AliasDenied("d".into()),
                400,
                "InvalidAliasNameException",
            ),
            (
                ProxyError::AliasUnreadable("u".into()),
                400,
                "InvalidAliasNameException",
            ),
            (ProxyError::BodyTooLarge { limit: 1 }, 413, "TagException"),
            (ProxyError::HeadTooLarge("h".into()), 431, "TagException"),
            (ProxyError::BodyTimeout(1), 408, "RequestTimeoutException"),
            (
                ProxyError::UnknownOperation("x".into()),
                400,
                "UnknownOperationException",
            ),
            (
                ProxyError::HostNotAllowed("h".into()),
                421,
                "MisdirectedRequest",
            ),
            (
                ProxyError::HostNotName("h".into()),
                421,
                "MisdirectedRequest",
            ),
            (
                ProxyError::HostNotTunnel {
                    host: "h".into(),
                    tunnel: "t".into(),
                },
                421,
                "MisdirectedRequest",
            ),
            (ProxyError::ConnectRefused("x".into()), 403, "Forbidden"),
            (ProxyError::TunnelConnect("t".into()), 502, "BadGateway"),
            (ProxyError::AuditUnavailable, 503, "ServiceUnavailable"),
            (
                ProxyError::BodyBudget { limit: 1 },
                503,
                "ServiceUnavailable",
            ),
            (ProxyError::UpstreamConnect("c".into()), 502, "BadGateway"),
            (ProxyError::UpstreamBroken("b".into()), 502, "BadGateway"),
            (ProxyError::UpstreamTimeout(1), 504, "GatewayTimeout"),
            (ProxyError::ShutDown, 504, "GatewayTimeout"),
            (
                ProxyError::UpstreamNoH2("n".into()),
                400,
                "UnsupportedHttpVersion",
            ),
        ];
        for (error, status, error_type) in table {
            let message = error.to_string();
            let response = error.into_response("rid-1");
            assert_eq!(response.status().as_u16(), status);
            let h = response.headers();
            assert_eq!(h["content-type"], AMZ_JSON);
            assert_eq!(h["x-amzn-requestid"], "rid-1");
            assert_eq!(h["x-amzn-errortype"], error_type);
            assert!(h.contains_key("x-kms-tag-guard"));
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["__type"], error_type);
            assert_eq!(body["message"], message.as_str());
        }
    }
}
