//! A CloudTrail event of a tag or alias change, back into the request it was, judged by
//! [`crate::decide::decision`] as live traffic is.
//!
//! CloudTrail writes the request's members in camelCase (`keyId`, `tags[].tagKey/tagValue`,
//! `tagKeys`, `aliasName`, `targetKeyId`, ...) where the API's JSON has PascalCase. The body is
//! rebuilt from `requestParameters` as written, member for member and in order, with the first
//! letter of every member name made upper case at every depth (every member name of the KMS
//! API is PascalCase): nothing is dropped and nothing merged, so a record with `tags` and `Tags`
//! becomes a body with `Tags` twice, which the strict parser refuses, as it would refuse the
//! request. Where the record shape is not documented (CreateKey's `tags`), this is also the
//! stricter reading: anything but `tagKey`/`tagValue` members fails the strict parse.
//!
//! The head is the one an SDK would have sent to the event's Region: `POST /`, the Region's
//! KMS host, `X-Amz-Target: TrentService.<eventName>`, the JSON content type, and, when
//! `userIdentity.accessKeyId` names the credential, an `Authorization` header with it, so that
//! rules limited by `key_ids` or `exempt_principals` apply as they would have live. An event
//! without an access key id is judged as a request whose credential cannot be read: no
//! exemption applies.

use http::{HeaderMap, HeaderValue, Method, Uri};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::decide::{decision, Head, Rules};
use crate::kms::operation::TARGET_PREFIX;
use crate::kms::TagOperation;
use crate::policy::Decision;

/// A record of a tag or alias change, the members replay reads.
#[derive(Debug, Deserialize)]
pub struct Event {
    #[serde(rename = "eventTime")]
    pub time: Option<String>,
    #[serde(rename = "eventID")]
    pub id: Option<String>,
    #[serde(rename = "awsRegion")]
    pub region: Option<String>,
    #[serde(rename = "errorCode")]
    pub error_code: Option<String>,
    #[serde(rename = "userIdentity")]
    pub identity: Option<Identity>,
    /// The request's body, rebuilt (`None`: the record has `null` or no `requestParameters`).
    #[serde(rename = "requestParameters")]
    pub body: Option<RequestBody>,
    #[serde(rename = "responseElements")]
    pub response: Option<serde_json::Value>,
    pub resources: Option<Vec<Resource>>,
}

/// `userIdentity`: who made the call.
#[derive(Debug, Deserialize)]
pub struct Identity {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(rename = "principalId")]
    pub principal_id: Option<String>,
    pub arn: Option<String>,
    #[serde(rename = "accessKeyId")]
    pub access_key_id: Option<String>,
    #[serde(rename = "invokedBy")]
    pub invoked_by: Option<String>,
}

/// One of `resources[]`.
#[derive(Debug, Deserialize)]
pub struct Resource {
    #[serde(rename = "ARN")]
    pub arn: Option<String>,
}

/// What replay made of one event.
#[derive(Debug)]
pub struct Judged {
    pub decision: Decision,
    /// The key concerned, as the record names it: the key ARN of `resources[]`, else the
    /// request's `KeyId`/`TargetKeyId`, else (CreateKey) the new key's ARN.
    pub key: Option<String>,
    /// The alias of an alias operation.
    pub alias: Option<String>,
}

impl Event {
    /// Who made the call: `userIdentity.arn`, else `type:principalId`, else the service that
    /// invoked it, else the type.
    pub fn principal(&self) -> String {
        let Some(identity) = &self.identity else {
            return "(no userIdentity)".into();
        };
        if let Some(arn) = identity.arn.as_deref().filter(|a| !a.is_empty()) {
            return arn.to_owned();
        }
        match (&identity.kind, &identity.principal_id, &identity.invoked_by) {
            (Some(kind), Some(id), _) => format!("{kind}:{id}"),
            (_, _, Some(service)) => service.clone(),
            (Some(kind), None, None) => kind.clone(),
            (None, Some(id), None) => id.clone(),
            (None, None, None) => "(unknown)".into(),
        }
    }

    /// The request this event was, judged.
    pub fn judge(&self, operation: TagOperation, rules: &Rules) -> Judged {
        let decision = match &self.body {
            Some(RequestBody(body)) => {
                let headers = self.headers(operation);
                let head = Head {
                    method: &Method::POST,
                    uri: &Uri::from_static("/"),
                    headers: &headers,
                    tunnel_host: None,
                    // CloudTrail knows no workload identity: a change is replayed as one from a
                    // caller without a client certificate.
                    caller: None,
                };
                decision(&head, body.as_bytes(), rules)
            }
            None => Decision::unreadable(
                "the record has no requestParameters object (CloudTrail leaves out parameters larger than 100 KB): the change cannot be judged; check it by hand"
                    .into(),
            ),
        };
        let member = |name: &str| -> Option<String> {
            let body = self.body.as_ref()?;
            let value: serde_json::Value = serde_json::from_str(&body.0).ok()?;
            value.get(name)?.as_str().map(str::to_owned)
        };
        let key = self
            .resources
            .iter()
            .flatten()
            .filter_map(|r| r.arn.as_deref())
            .find(|arn| arn.contains(":key/"))
            .map(str::to_owned)
            .or_else(|| {
                member(if operation.is_alias() {
                    "TargetKeyId"
                } else {
                    "KeyId"
                })
            })
            .or_else(|| {
                let metadata = self.response.as_ref()?.get("keyMetadata")?;
                metadata.get("arn")?.as_str().map(str::to_owned)
            });
        let alias = operation.is_alias().then(|| member("AliasName")).flatten();
        Judged {
            decision,
            key,
            alias,
        }
    }

    /// The head an SDK would have sent for this request.
    fn headers(&self, operation: TagOperation) -> HeaderMap {
        let region = self
            .region
            .as_deref()
            .filter(|r| {
                !r.is_empty()
                    && r.len() <= 32
                    && r.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
            .unwrap_or("us-east-1");
        let domain = partition_suffix(region);
        let mut headers = HeaderMap::new();
        let value = |text: String| HeaderValue::try_from(text).ok();
        if let Some(v) = value(format!("kms.{region}.{domain}")) {
            headers.insert(http::header::HOST, v);
        }
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-amz-json-1.1"),
        );
        if let Some(v) = value(format!("{TARGET_PREFIX}{}", operation.name())) {
            headers.insert("x-amz-target", v);
        }
        let akid = self
            .identity
            .as_ref()
            .and_then(|i| i.access_key_id.as_deref())
            .filter(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric()));
        if let Some(akid) = akid {
            let date: String = self
                .time
                .as_deref()
                .unwrap_or("")
                .chars()
                .filter(char::is_ascii_digit)
                .take(8)
                .collect();
            let date = if date.len() == 8 {
                date
            } else {
                "20000101".into()
            };
            if let Some(v) = value(format!(
                "AWS4-HMAC-SHA256 Credential={akid}/{date}/{region}/kms/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=0"
            )) {
                headers.insert(http::header::AUTHORIZATION, v);
            }
        }
        headers
    }
}

/// The DNS suffix of a Region's partition (the SDKs' `partitions.json`, as `crate::endpoints`
/// lists them), for the host its requests went to.
fn partition_suffix(region: &str) -> &'static str {
    const BY_PREFIX: [(&str, &str); 6] = [
        ("cn-", "amazonaws.com.cn"),
        ("us-isob-", "sc2s.sgov.gov"),
        ("us-isof-", "csp.hci.ic.gov"),
        ("us-iso-", "c2s.ic.gov"),
        ("eu-isoe-", "cloud.adc-e.uk"),
        ("eusc-", "amazonaws.eu"),
    ];
    BY_PREFIX
        .iter()
        .find(|(prefix, _)| region.starts_with(prefix))
        .map_or("amazonaws.com", |(_, suffix)| suffix)
}

/// `requestParameters`, rewritten as the API's JSON body (see the module's comment).
#[derive(Debug)]
pub struct RequestBody(pub String);

impl<'de> Deserialize<'de> for RequestBody {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = String::new();
        d.deserialize_any(Transcode { out: &mut out })?;
        Ok(RequestBody(out))
    }
}

/// Writes the value it visits as JSON, member names PascalCased.
struct Transcode<'a> {
    out: &'a mut String,
}

impl<'de> DeserializeSeed<'de> for Transcode<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

fn push_json_string(out: &mut String, s: &str) {
    // Serialising a &str into JSON cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

impl<'de> Visitor<'de> for Transcode<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.out.push_str(if v { "true" } else { "false" });
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.out.push_str(&v.to_string());
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.out.push_str(&v.to_string());
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.out
            .push_str(&serde_json::to_string(&v).unwrap_or_else(|_| "null".into()));
        Ok(())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        push_json_string(self.out, v);
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.out.push_str("null");
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.visit_unit()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.out.push('[');
        let mut first = true;
        loop {
            let at = self.out.len();
            if !first {
                self.out.push(',');
            }
            if seq
                .next_element_seed(Transcode {
                    out: &mut *self.out,
                })?
                .is_none()
            {
                self.out.truncate(at);
                break;
            }
            first = false;
        }
        self.out.push(']');
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.out.push('{');
        let mut first = true;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if !first {
                self.out.push(',');
            }
            first = false;
            push_json_string(self.out, &pascal_case(&key));
            self.out.push(':');
            map.next_value_seed(Transcode {
                out: &mut *self.out,
            })?;
        }
        self.out.push('}');
        Ok(())
    }
}

/// `tagKey` → `TagKey`: the first letter upper case (ASCII only; the API's names are ASCII).
fn pascal_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut chars = name.chars();
    if let Some(first) = chars.next() {
        out.push(first.to_ascii_uppercase());
        out.push_str(chars.as_str());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(params: &str) -> String {
        serde_json::from_str::<RequestBody>(params).unwrap().0
    }

    #[test]
    fn the_host_is_the_regions_kms_endpoint_in_its_partition() {
        for (region, suffix) in [
            ("us-east-1", "amazonaws.com"),
            ("us-gov-west-1", "amazonaws.com"),
            ("cn-north-1", "amazonaws.com.cn"),
            ("us-iso-east-1", "c2s.ic.gov"),
            ("us-isob-east-1", "sc2s.sgov.gov"),
            ("eusc-de-east-1", "amazonaws.eu"),
        ] {
            assert_eq!(partition_suffix(region), suffix, "{region}");
            assert!(crate::endpoints::is_kms_name(&format!(
                "kms.{region}.{suffix}"
            )));
        }
    }

    #[test]
    fn request_parameters_become_the_api_body_member_for_member() {
        assert_eq!(
            body(r#"{"keyId":"k","tags":[{"tagKey":"Dept","tagValue":"IT"}]}"#),
            r#"{"KeyId":"k","Tags":[{"TagKey":"Dept","TagValue":"IT"}]}"#
        );
        assert_eq!(
            body(
                r#"{"keyId":"k","tagKeys":["a","b"],"x":[],"y":{},"n":1.5,"m":-2,"t":true,"z":null}"#
            ),
            r#"{"KeyId":"k","TagKeys":["a","b"],"X":[],"Y":{},"N":1.5,"M":-2,"T":true,"Z":null}"#
        );
        // Nothing merged: both spellings stay, for the strict parser to refuse.
        assert_eq!(body(r#"{"tags":[],"Tags":[]}"#), r#"{"Tags":[],"Tags":[]}"#);
        // Escapes decoded, then written again.
        assert_eq!(body(r#"{"k\u0065yId":"a\"b"}"#), r#"{"KeyId":"a\"b"}"#);
    }
}
