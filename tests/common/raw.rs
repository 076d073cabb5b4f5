//! Raw HTTP/1.1 over a TcpStream, for requests no well-behaved client would send.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::sigv4;

/// How long `send` / `read_response` wait for a complete response.
pub const RAW_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed HTTP/1.x response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub reason: String,
    /// In order received, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked if it was chunked).
    pub body: Vec<u8>,
}

#[allow(dead_code)]
impl RawResponse {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of this header (case-insensitive).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The body as JSON (panics, showing the body, if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): status {} body {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Send `request` on a fresh connection and read one response (panics on I/O error/timeout).
pub async fn send(addr: SocketAddr, request: &[u8]) -> RawResponse {
    try_send(addr, request)
        .await
        .unwrap_or_else(|e| panic!("raw request to {addr} failed: {e}"))
}

/// Like [`send`], but returns I/O errors (including the peer closing without an answer).
pub async fn try_send(addr: SocketAddr, request: &[u8]) -> io::Result<RawResponse> {
    let mut conn = RawConn::connect(addr).await?;
    conn.write(request).await?;
    conn.read_response().await
}

/// A raw connection that can send a request in pieces and read several responses.
pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

#[allow(dead_code)]
impl RawConn {
    pub async fn connect(addr: SocketAddr) -> io::Result<RawConn> {
        let stream = tokio::time::timeout(RAW_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(RawConn {
            stream,
            buf: Vec::new(),
        })
    }

    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Read one final response (interim 1xx responses other than 101 are skipped), within
    /// [`RAW_TIMEOUT`].
    pub async fn read_response(&mut self) -> io::Result<RawResponse> {
        self.read_response_within(RAW_TIMEOUT).await
    }

    pub async fn read_response_within(&mut self, timeout: Duration) -> io::Result<RawResponse> {
        tokio::time::timeout(timeout, self.read_response_inner())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "response timed out"))?
    }

    /// Read an interim or final response head+body, whichever comes first (does not skip 1xx).
    pub async fn read_any_response(&mut self) -> io::Result<RawResponse> {
        tokio::time::timeout(RAW_TIMEOUT, self.read_one())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "response timed out"))?
    }

    /// True if the peer closed the connection (reads EOF within `timeout`, discarding data).
    pub async fn is_closed_within(&mut self, timeout: Duration) -> bool {
        let mut tmp = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut tmp)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    async fn read_response_inner(&mut self) -> io::Result<RawResponse> {
        loop {
            let resp = self.read_one().await?;
            if (100..200).contains(&resp.status) && resp.status != 101 {
                continue;
            }
            return Ok(resp);
        }
    }

    async fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 16 * 1024];
        let n = self.stream.read(&mut tmp).await?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    async fn read_one(&mut self) -> io::Result<RawResponse> {
        let head_end = loop {
            if let Some(pos) = find(&self.buf, b"\r\n\r\n") {
                break pos;
            }
            if self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed before a response head (got {:?})",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err(bad(format!("not an HTTP/1 status line: {status_line:?}")));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
        let reason = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        for line in lines {
            let (n, v) = line
                .split_once(':')
                .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        let mut resp = RawResponse {
            status,
            reason,
            headers,
            body: Vec::new(),
        };
        if (100..200).contains(&status) || status == 204 || status == 304 {
            return Ok(resp);
        }
        let chunked = resp
            .header_all("transfer-encoding")
            .iter()
            .any(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            resp.body = self.read_chunked().await?;
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| bad(format!("bad content-length {len:?}")))?;
            while self.buf.len() < len {
                if self.fill().await? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("body truncated: {} of {len} bytes", self.buf.len()),
                    ));
                }
            }
            resp.body = self.buf.drain(..len).collect();
        } else {
            while self.fill().await? != 0 {}
            resp.body = std::mem::take(&mut self.buf);
        }
        Ok(resp)
    }

    async fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(pos) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..pos]).into_owned();
                self.buf.drain(..pos + 2);
                return Ok(line);
            }
            if self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a chunked body",
                ));
            }
        }
    }

    async fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line().await?;
            let size_str = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_str, 16)
                .map_err(|_| bad(format!("bad chunk size line {line:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.read_line().await?.is_empty() {}
                return Ok(body);
            }
            while self.buf.len() < size + 2 {
                if self.fill().await? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a chunk",
                    ));
                }
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
        }
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// An HTTP/1.1 request held as parts, so tests can break it before serialising.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub method: String,
    pub target: String,
    /// In order, names as given; `to_bytes` writes them verbatim (repeats allowed).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[allow(dead_code)]
impl RawRequest {
    /// A correctly signed KMS request (test credentials, [`super::REGION`], current time),
    /// signed like botocore (`content-type;host;x-amz-date;x-amz-target`), with
    /// `Content-Length` present but unsigned.
    pub fn signed_kms(host: &str, target: &str, body: &[u8]) -> RawRequest {
        Self::signed_kms_with(
            host,
            target,
            body,
            super::ACCESS_KEY_ID,
            super::SECRET_KEY,
            super::REGION,
        )
    }

    pub fn signed_kms_with(
        host: &str,
        target: &str,
        body: &[u8],
        access_key_id: &str,
        secret: &str,
        region: &str,
    ) -> RawRequest {
        let signed = sigv4::sign(
            "POST",
            host,
            target,
            body,
            access_key_id,
            secret,
            region,
            None,
        );
        RawRequest {
            method: "POST".into(),
            target: "/".into(),
            headers: vec![
                ("Host".into(), host.into()),
                ("Content-Type".into(), "application/x-amz-json-1.1".into()),
                ("Content-Length".into(), body.len().to_string()),
                ("X-Amz-Target".into(), target.into()),
                ("X-Amz-Date".into(), signed.amz_date),
                ("Authorization".into(), signed.authorization),
            ],
            body: body.to_vec(),
        }
    }

    /// First value of a header (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Replace the value of the first header with this name, or append it.
    pub fn set_header(&mut self, name: &str, value: &str) -> &mut Self {
        match self
            .headers
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            Some(h) => h.1 = value.to_string(),
            None => self.headers.push((name.to_string(), value.to_string())),
        }
        self
    }

    /// Append a header (even if one with this name exists).
    pub fn add_header(&mut self, name: &str, value: &str) -> &mut Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Remove every header with this name.
    pub fn remove_header(&mut self, name: &str) -> &mut Self {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self
    }

    /// Replace the body and fix `Content-Length` (the signature is not redone).
    pub fn set_body(&mut self, body: &[u8]) -> &mut Self {
        self.body = body.to_vec();
        let len = body.len().to_string();
        self.set_header("Content-Length", &len)
    }

    /// The head only (request line and headers, ending in the blank line).
    pub fn head_bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.target).into_bytes();
        for (n, v) in &self.headers {
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Head and body, verbatim.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.head_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// A correctly signed HTTP/1.1 `POST /` KMS request (test credentials, current time), with
/// `extra_headers` appended after signing (so they are not signed).
pub fn kms_request(
    host: &str,
    target: &str,
    body: &[u8],
    extra_headers: &[(&str, &str)],
) -> Vec<u8> {
    let mut req = RawRequest::signed_kms(host, target, body);
    for (n, v) in extra_headers {
        req.add_header(n, v);
    }
    req.to_bytes()
}

/// How [`RawConn::trickle`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrickleEnd {
    /// The peer sent something (kept for [`RawConn::read_response`]).
    Answered,
    /// The peer closed or reset the connection.
    Closed,
    /// Every byte was sent and the peer said nothing.
    AllSent,
}

/// What happened while trickling.
#[derive(Debug, Clone, Copy)]
pub struct Trickled {
    pub end: TrickleEnd,
    /// Bytes written before the end.
    pub sent: usize,
    /// From the first byte written to the end.
    pub elapsed: Duration,
}

#[allow(dead_code)]
impl RawConn {
    /// Sends `bytes` one at a time, `interval` apart, watching the connection in between, and
    /// stops as soon as the peer answers or closes. What the peer sent stays buffered for
    /// [`RawConn::read_response`].
    pub async fn trickle(&mut self, bytes: &[u8], interval: Duration) -> Trickled {
        let started = tokio::time::Instant::now();
        let mut tmp = [0u8; 16 * 1024];
        let done = |end, sent| Trickled {
            end,
            sent,
            elapsed: started.elapsed(),
        };
        for (i, byte) in bytes.iter().enumerate() {
            if self.write(std::slice::from_ref(byte)).await.is_err() {
                return done(TrickleEnd::Closed, i);
            }
            match tokio::time::timeout(interval, self.stream.read(&mut tmp)).await {
                Err(_) => {}
                Ok(Ok(0)) | Ok(Err(_)) => return done(TrickleEnd::Closed, i + 1),
                Ok(Ok(n)) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return done(TrickleEnd::Answered, i + 1);
                }
            }
        }
        done(TrickleEnd::AllSent, bytes.len())
    }
}
