//! KMS's answers, as far as the outcome record of a forwarded tag change reads them.

/// The largest KMS answer to a tag-changing request the proxy reads to record its outcome. KMS
/// answers to these operations are a few KiB.
pub const MAX_ANSWER_BYTES: usize = 4 << 20;

/// What KMS answered a forwarded tag change.
#[derive(Debug, Clone)]
pub struct KmsAnswer<'a> {
    pub status: u16,
    /// Its `x-amzn-RequestId`.
    pub aws_request_id: Option<String>,
    /// Its `x-amzn-ErrorType`, if any.
    pub aws_error_header: Option<String>,
    /// The body, without chunked framing.
    pub body: &'a [u8],
}

impl KmsAnswer<'_> {
    /// The error type of an error answer (awsJson 1.1): the body's `__type` (or `code`), else the
    /// `x-amzn-ErrorType` header, without namespace or URI (`com.amazon#NotFoundException:http://…`
    /// is `NotFoundException`). `None` for a success.
    pub fn error_type(&self) -> Option<String> {
        if self.status < 400 {
            return None;
        }
        let from_body = serde_json::from_slice::<serde_json::Value>(self.body)
            .ok()
            .and_then(|v| {
                v.get("__type")
                    .or_else(|| v.get("code"))
                    .and_then(|t| t.as_str())
                    .map(str::to_owned)
            });
        let raw = from_body.or_else(|| self.aws_error_header.clone())?;
        let before_colon = raw.split(':').next().unwrap_or(&raw);
        Some(
            before_colon
                .rsplit('#')
                .next()
                .unwrap_or(before_colon)
                .to_owned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(header: Option<&str>, body: &[u8]) -> Option<String> {
        KmsAnswer {
            status: 400,
            aws_request_id: None,
            aws_error_header: header.map(str::to_owned),
            body,
        }
        .error_type()
    }

    #[test]
    fn aws_error_types_are_sanitised() {
        assert_eq!(
            error(
                None,
                br#"{"__type":"com.amazon#NotFoundException:http://x","message":"m"}"#
            ),
            Some("NotFoundException".into())
        );
        assert_eq!(
            error(Some("TagException"), b"<html>"),
            Some("TagException".into())
        );
        assert_eq!(error(None, b""), None);
        let ok = KmsAnswer {
            status: 200,
            aws_request_id: None,
            aws_error_header: Some("X".into()),
            body: b"{}",
        };
        assert_eq!(ok.error_type(), None);
    }
}
