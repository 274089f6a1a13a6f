//! A small identity-provider stub on 127.0.0.1:0: answers GETs per path with what the test set (a
//! key set, a discovery document, an error, a slow answer), counts requests per path and accepted
//! connections, and closes each connection after its answer.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One path's answer.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub extra_headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Wait this long after reading the request before answering.
    pub delay: Duration,
}

impl Reply {
    pub fn json(body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status: 200,
            content_type: "application/json".into(),
            extra_headers: Vec::new(),
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    pub fn status(mut self, status: u16) -> Reply {
        self.status = status;
        self
    }

    pub fn delayed(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Reply>,
    hits: HashMap<String, usize>,
}

pub struct IdpStub {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    connections: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
}

impl IdpStub {
    pub fn start() -> IdpStub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the IdP stub");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let connections = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicBool::new(false));
        let (st, conns, cl) = (state.clone(), connections.clone(), closed.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if cl.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                conns.fetch_add(1, Ordering::SeqCst);
                let (st, cl) = (st.clone(), cl.clone());
                std::thread::spawn(move || serve(stream, &st, &cl));
            }
        });
        IdpStub {
            addr,
            state,
            connections,
            closed,
        }
    }

    /// `http://127.0.0.1:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set(&self, path: &str, reply: Reply) {
        self.state
            .lock()
            .unwrap()
            .routes
            .insert(path.to_string(), reply);
    }

    /// Serves `body` as `application/json` with 200 at `path`.
    pub fn serve_json(&self, path: &str, body: impl Into<Vec<u8>>) {
        self.set(path, Reply::json(body));
    }

    /// Requests that arrived for `path` (counted when the request has been read, before any delay).
    pub fn hits(&self, path: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .hits
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// TCP connections accepted, whatever came on them.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for IdpStub {
    fn drop(&mut self) {
        // Ends the accept loop (it sees the flag on its next connection) and any delayed answer.
        self.closed.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(mut stream: TcpStream, state: &Mutex<State>, closed: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let target = text.split_whitespace().nth(1).unwrap_or("").to_string();
    let path = target.split('?').next().unwrap_or("").to_string();
    let reply = {
        let mut st = state.lock().unwrap();
        *st.hits.entry(path.clone()).or_insert(0) += 1;
        st.routes.get(&path).cloned()
    };
    let reply = reply.unwrap_or_else(|| Reply::json(r#"{"error":"not found"}"#).status(404));
    let start = Instant::now();
    while start.elapsed() < reply.delay {
        if closed.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = format!(
        "HTTP/1.1 {} X\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.content_type,
        reply.body.len()
    );
    for (n, v) in &reply.extra_headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(&reply.body);
    let _ = stream.write_all(&out);
    let _ = stream.flush();
}
