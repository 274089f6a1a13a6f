//! A stub FHIR upstream on 127.0.0.1:0 that speaks HTTP/1.1 (keep-alive, Content-Length and chunked
//! request bodies), records every request exactly as it arrived, and answers with a small FHIR JSON
//! body naming itself, so a test can tell which upstream served a request. It can also misbehave on
//! purpose (hang, reset, send raw bytes, trickle), and serve TLS with the fixture certificate.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Condvar, Mutex};
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

/// How the stub answers.
#[derive(Clone)]
pub enum Mode {
    /// The default Bundle naming the stub.
    Bundle,
    /// Fixed extra headers (must include Content-Type) and body.
    Fixed(Vec<(String, String)>, Vec<u8>),
    /// Exactly these bytes, then close the connection (a reset when `reset`).
    Raw { bytes: Vec<u8>, reset: bool },
    /// These bytes as the answer, then keep serving the connection (to see whether the proxy reuses
    /// a connection whose framing went wrong).
    RawKeepOpen(Vec<u8>),
    /// Read the request, then never answer.
    Hang,
    /// The Bundle for a connection's first request; a later request on the same connection is read
    /// and the connection closed unanswered (a server whose keep-alive ran out as the request came).
    OncePerConnection,
    /// The response header, then `body` in `chunk`-byte pieces every `every`.
    Trickle {
        content_type: String,
        body: Vec<u8>,
        chunk: usize,
        every: Duration,
    },
    /// The response header (with the whole length) and `first`; then, once the test has passed the
    /// `gate` as well, `rest`.
    Gated {
        content_type: String,
        first: Vec<u8>,
        rest: Vec<u8>,
        gate: Arc<std::sync::Barrier>,
    },
}

#[derive(Clone)]
struct Behaviour {
    delay: Duration,
    mode: Mode,
    /// While the flag is set, requests are read and recorded but not answered.
    hold: Arc<(Mutex<bool>, Condvar)>,
}

pub struct StubUpstream {
    pub addr: SocketAddr,
    tls: bool,
    recorded: Arc<Mutex<Vec<Recorded>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    connections: Arc<Mutex<usize>>,
}

impl StubUpstream {
    /// Starts a stub whose responses carry `name`.
    pub fn start(name: &str) -> StubUpstream {
        Self::start_with(name, None)
    }

    /// Starts a stub serving TLS with the fixture certificate (`localhost`, `127.0.0.1`, signed by
    /// the fixture CA).
    pub fn start_tls(name: &str) -> StubUpstream {
        Self::start_with(name, Some(tls_config()))
    }

    fn start_with(name: &str, tls: Option<Arc<rustls::ServerConfig>>) -> StubUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind stub upstream");
        let addr = listener.local_addr().unwrap();
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(Mutex::new(Behaviour {
            delay: Duration::ZERO,
            mode: Mode::Bundle,
            hold: Arc::new((Mutex::new(false), Condvar::new())),
        }));
        let connections = Arc::new(Mutex::new(0));
        let (rec, beh, nm, conns) = (
            recorded.clone(),
            behaviour.clone(),
            name.to_string(),
            connections.clone(),
        );
        let is_tls = tls.is_some();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                *conns.lock().unwrap() += 1;
                let (rec, beh, nm, tls) = (rec.clone(), beh.clone(), nm.clone(), tls.clone());
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                    match tls {
                        None => serve(stream, &nm, &rec, &beh),
                        Some(cfg) => {
                            let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                                return;
                            };
                            serve(rustls::StreamOwned::new(conn, stream), &nm, &rec, &beh)
                        }
                    }
                });
            }
        });
        StubUpstream {
            addr,
            tls: is_tls,
            recorded,
            behaviour,
            connections,
        }
    }

    /// `http[s]://127.0.0.1:PORT{base_path}`
    pub fn url(&self, base_path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{base_path}", self.addr)
    }

    /// Delays every response by `d` (for timeouts and draining).
    pub fn set_delay(&self, d: Duration) {
        self.behaviour.lock().unwrap().delay = d;
    }

    /// Holds every answer (requests are still read and recorded) until [`StubUpstream::release`]:
    /// a node that stays busy for as long as a test needs, whatever the machine's speed.
    pub fn hold(&self) {
        let hold = self.behaviour.lock().unwrap().hold.clone();
        *hold.0.lock().unwrap() = true;
    }

    /// Lets held answers (and every later one) go.
    pub fn release(&self) {
        let hold = self.behaviour.lock().unwrap().hold.clone();
        *hold.0.lock().unwrap() = false;
        hold.1.notify_all();
    }

    pub fn set_mode(&self, mode: Mode) {
        self.behaviour.lock().unwrap().mode = mode;
    }

    /// Answers every request with `headers` (which must include Content-Type) and `body`.
    pub fn set_response(&self, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) {
        self.set_mode(Mode::Fixed(
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

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        *self.connections.lock().unwrap()
    }
}

fn tls_config() -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = super::proxy::fixture("tls");
    let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    )
}

fn serve<S: Read + Write>(
    stream: S,
    name: &str,
    rec: &Mutex<Vec<Recorded>>,
    beh: &Mutex<Behaviour>,
) {
    let mut reader = BufReader::new(stream);
    let mut answered = 0usize;
    loop {
        let Some(r) = read_request(&mut reader) else {
            return;
        };
        let complete = r.complete;
        rec.lock().unwrap().push(r.clone());
        if !complete {
            return;
        }
        let Behaviour { delay, mode, hold } = beh.lock().unwrap().clone();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let (held, released) = &*hold;
        drop(released.wait_while(held.lock().unwrap(), |h| *h).unwrap());
        let w = reader.get_mut();
        let head_only = r.method == "HEAD";
        let ok = match mode {
            Mode::OncePerConnection if answered > 0 => return,
            Mode::Bundle | Mode::OncePerConnection => {
                let body = format!(
                    r#"{{"resourceType":"Bundle","type":"searchset","total":0,"meta":{{"tag":[{{"code":"{name}"}}]}},"upstream":"{name}","method":"{}"}}"#,
                    r.method
                );
                respond(
                    w,
                    name,
                    &[("Content-Type".into(), "application/fhir+json".into())],
                    body.as_bytes(),
                    head_only,
                )
            }
            Mode::Fixed(headers, body) => respond(w, name, &headers, &body, head_only),
            Mode::Raw { bytes, reset } => {
                let _ = w.write_all(&bytes);
                let _ = w.flush();
                if reset {
                    // Dropping with unread data pending makes the kernel send a reset; give the bytes a
                    // moment to leave first.
                    std::thread::sleep(Duration::from_millis(50));
                }
                return;
            }
            Mode::RawKeepOpen(bytes) => w.write_all(&bytes).and_then(|()| w.flush()).is_ok(),
            Mode::Hang => {
                std::thread::sleep(Duration::from_secs(60));
                return;
            }
            Mode::Trickle {
                content_type,
                body,
                chunk,
                every,
            } => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nX-Upstream: {name}\r\n\r\n",
                    body.len()
                );
                let mut ok = w
                    .write_all(head.as_bytes())
                    .and_then(|()| w.flush())
                    .is_ok();
                for piece in body.chunks(chunk.max(1)) {
                    std::thread::sleep(every);
                    ok = ok && w.write_all(piece).and_then(|()| w.flush()).is_ok();
                }
                ok
            }
            Mode::Gated {
                content_type,
                first,
                rest,
                gate,
            } => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nX-Upstream: {name}\r\n\r\n",
                    first.len() + rest.len()
                );
                let ok = w
                    .write_all(head.as_bytes())
                    .and_then(|()| w.write_all(&first))
                    .and_then(|()| w.flush())
                    .is_ok();
                gate.wait();
                ok && w.write_all(&rest).and_then(|()| w.flush()).is_ok()
            }
        };
        if !ok {
            return;
        }
        answered += 1;
    }
}

fn respond<W: Write>(
    w: &mut W,
    name: &str,
    headers: &[(String, String)],
    body: &[u8],
    head_only: bool,
) -> bool {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Upstream: {name}\r\n",
        body.len()
    );
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    w.write_all(&out).and_then(|()| w.flush()).is_ok()
}

fn read_request<R: Read>(reader: &mut BufReader<R>) -> Option<Recorded> {
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
