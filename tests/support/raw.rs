//! Raw HTTP/1.1 over a TcpStream: for requests a client library would normalise (dot segments,
//! encoded slashes, duplicate headers) and for checking exactly what is on the wire.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// `GET target` with an optional `Authorization` header value, on a fresh connection.
pub fn get(port: u16, target: &str, authorization: Option<&str>) -> RawResponse {
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    send(
        port,
        format!("GET {target} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
}

/// The first header called `name` (any case).
pub fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Sends `request` as is and reads one response (the request should say `Connection: close`).
pub fn send(port: u16, request: &[u8]) -> RawResponse {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to proxy");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(request).unwrap();
    read_response(&mut s, Vec::new())
}

/// Reads until one response is complete (or the connection closes or stays silent for the read
/// timeout), starting with the bytes in `buf` already read from `s`.
pub fn read_response(s: &mut TcpStream, mut buf: Vec<u8>) -> RawResponse {
    if let Some(r) = parse_complete(&buf) {
        return r;
    }
    let mut chunk = [0u8; 16384];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Some(r) = parse_complete(&buf) {
                    return r;
                }
            }
            Err(_) => break,
        }
    }
    parse_complete(&buf).unwrap_or_else(|| {
        // Connection closed: the body is whatever arrived.
        parse_head(&buf)
            .map(|(mut r, head_len)| {
                r.body = buf[head_len..].to_vec();
                r
            })
            .unwrap_or(RawResponse {
                status: 0,
                headers: vec![],
                body: buf,
            })
    })
}

fn parse_head(buf: &[u8]) -> Option<(RawResponse, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => Some((
            RawResponse {
                status: resp.code.unwrap_or(0),
                headers: resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect(),
                body: Vec::new(),
            },
            n,
        )),
        _ => None,
    }
}

/// Decodes a complete chunked body, or `None` while it is incomplete.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if data.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

fn parse_complete(buf: &[u8]) -> Option<RawResponse> {
    let (mut r, head_len) = parse_head(buf)?;
    if r.header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        r.body = dechunk(&buf[head_len..])?;
        return Some(r);
    }
    let len: usize = r.header("content-length")?.trim().parse().ok()?;
    if buf.len() >= head_len + len {
        r.body = buf[head_len..head_len + len].to_vec();
        Some(r)
    } else {
        None
    }
}
