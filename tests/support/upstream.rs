//! A stub FHIR upstream on 127.0.0.1:0 that speaks HTTP/1.1 (keep-alive, Content-Length and chunked
//! request bodies), records every request exactly as it arrived, and answers with a small FHIR JSON
//! body naming itself, so a test can tell which upstream served a request.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The raw request target (path and query), byte for byte.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// False when the connection ended before the declared body arrived.
    pub complete: bool,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        super::raw::find_header(&self.headers, name)
    }
    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }
}

#[derive(Clone)]
struct Behaviour {
    delay: Duration,
    /// A fixed response (extra headers, body) instead of the default Bundle; `{base}` in either is
    /// replaced by this upstream's own base URL as the request reached it.
    custom: Option<CustomResponse>,
}

type CustomResponse = (Vec<(String, String)>, Vec<u8>);

pub struct StubUpstream {
    pub addr: SocketAddr,
    recorded: Arc<Mutex<Vec<Recorded>>>,
    behaviour: Arc<Mutex<Behaviour>>,
}

impl StubUpstream {
    /// Starts a stub whose responses carry `name`.
    pub fn start(name: &str) -> StubUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind stub upstream");
        let addr = listener.local_addr().unwrap();
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(Mutex::new(Behaviour {
            delay: Duration::ZERO,
            custom: None,
        }));
        let (rec, beh, nm) = (recorded.clone(), behaviour.clone(), name.to_string());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (rec, beh, nm) = (rec.clone(), beh.clone(), nm.clone());
                std::thread::spawn(move || serve(stream, &nm, &rec, &beh));
            }
        });
        StubUpstream {
            addr,
            recorded,
            behaviour,
        }
    }

    /// `http://127.0.0.1:PORT{base_path}`
    pub fn url(&self, base_path: &str) -> String {
        format!("http://{}{base_path}", self.addr)
    }

    /// Delays every response by `d` (for timeouts and draining).
    pub fn set_delay(&self, d: Duration) {
        self.behaviour.lock().unwrap().delay = d;
    }

    /// Answers every request with `headers` (which must include Content-Type) and `body`.
    pub fn set_response(&self, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) {
        self.behaviour.lock().unwrap().custom = Some((
            headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body.into(),
        ));
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.recorded.lock().unwrap().clone()
    }

    pub fn last(&self) -> Recorded {
        self.requests()
            .pop()
            .expect("the upstream received no request")
    }

    pub fn count(&self) -> usize {
        self.recorded.lock().unwrap().len()
    }
}

fn serve(stream: TcpStream, name: &str, rec: &Mutex<Vec<Recorded>>, beh: &Mutex<Behaviour>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        let Some(r) = read_request(&mut reader) else {
            return;
        };
        let complete = r.complete;
        rec.lock().unwrap().push(r.clone());
        if !complete {
            return;
        }
        let Behaviour { delay, custom } = beh.lock().unwrap().clone();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        if let Some((headers, body)) = custom {
            let mut out = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Upstream: {name}\r\n",
                body.len()
            );
            for (n, v) in headers {
                out.push_str(&format!("{n}: {v}\r\n"));
            }
            out.push_str("\r\n");
            let mut out = out.into_bytes();
            if r.method != "HEAD" {
                out.extend_from_slice(&body);
            }
            if writer.write_all(&out).is_err() {
                return;
            }
            continue;
        }
        let body = format!(
            r#"{{"resourceType":"Bundle","type":"searchset","total":0,"meta":{{"tag":[{{"code":"{name}"}}]}},"upstream":"{name}","method":"{}"}}"#,
            r.method
        );
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\nX-Upstream: {name}\r\n\r\n",
            body.len()
        );
        let mut out = head.into_bytes();
        if r.method != "HEAD" {
            out.extend_from_slice(body.as_bytes());
        }
        if writer.write_all(&out).is_err() {
            return;
        }
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Recorded> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = reader.read_until(b'\n', &mut line).ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" || line == b"\n" {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(&head).ok()?;
    let method = req.method?.to_string();
    let target = req.path?.to_string();
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    let mut complete = true;
    if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        loop {
            let mut size_line = String::new();
            if reader.read_line(&mut size_line).ok()? == 0 {
                complete = false;
                break;
            }
            let size = usize::from_str_radix(size_line.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0u8; size + 2];
            if reader.read_exact(&mut chunk).is_err() {
                complete = false;
                break;
            }
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(len) = get("content-length").and_then(|v| v.trim().parse::<usize>().ok()) {
        body.resize(len, 0);
        if reader.read_exact(&mut body).is_err() {
            complete = false;
        }
    }
    Some(Recorded {
        method,
        target,
        headers,
        body,
        complete,
    })
}
