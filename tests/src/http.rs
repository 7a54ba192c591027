//! A raw HTTP/1.1 client: sends exactly the bytes a test wants (several copies of a header,
//! values that are not UTF-8), which ordinary clients refuse to do.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A response, read to the end of the connection.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of a header (names compared without case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).context("response body is not JSON")
    }

    /// The refusal code of a JSON error body.
    pub fn code(&self) -> String {
        self.json()
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .unwrap_or_default()
    }
}

/// Send one request on a new connection (`Connection: close`) and read the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &[u8])],
) -> Result<RawResponse> {
    send(TcpStream::connect(addr)?, method, path, headers)
}

/// [`request`] from the local address `from` (any of 127.0.0.0/8 on Linux's loopback): the
/// proxy sees another client.
pub fn request_from(
    from: std::net::IpAddr,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &[u8])],
) -> Result<RawResponse> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    send(socket.into(), method, path, headers)
}

fn send(
    mut stream: TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &[u8])],
) -> Result<RawResponse> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out =
        format!("{method} {path} HTTP/1.1\r\nhost: api.test\r\nconnection: close\r\n").into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"content-length: 0\r\n\r\n");
    stream.write_all(&out)?;
    read_response(&mut stream)
}

/// Read one response: the head, then `content-length` bytes, a chunked body, or up to EOF.
/// Not reading to EOF matters: Envoy delays closing a connection (1 s) until the client does.
fn read_response(stream: &mut TcpStream) -> Result<RawResponse> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        if let Some(response) = complete(&raw)? {
            return Ok(response);
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return parse(&raw);
        }
        raw.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
}

/// The response if `raw` holds all of it.
fn complete(raw: &[u8]) -> Result<Option<RawResponse>> {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let response = parse(raw)?;
    let body_len = raw.len() - split - 4;
    if let Some(length) = response
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        return Ok((body_len >= length).then_some(response));
    }
    if response
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        return Ok(raw.ends_with(b"0\r\n\r\n").then_some(response));
    }
    Ok(None)
}

fn parse(raw: &[u8]) -> Result<RawResponse> {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("no complete response head in {} bytes", raw.len());
    };
    let head = String::from_utf8_lossy(raw.get(..split).unwrap_or_default());
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect::<Vec<_>>();
    let mut body = raw.get(split + 4..).unwrap_or_default().to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"))
    {
        body = dechunk(&body);
    }
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(data.get(..eol).unwrap_or_default()).to_string();
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        else {
            break;
        };
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(data.get(start..start + size).unwrap_or_default());
        data = data.get(start + size + 2..).unwrap_or_default();
    }
    out
}
