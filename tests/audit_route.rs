//! The audit log's `route` and `method` fields repeat only FHIR words and known methods: client path
//! text (ids, names, e-mail addresses shaped like `_keywords`, `$operations` or type names) and
//! extension methods never reach the log, with or without a valid token.

use crate::support::tokens::token;
use crate::support::{raw, Env, TENANT_A};

const CANARY: &str = "Cnryzq";

/// The words a route template may hold, besides placeholders; a sample of the allow-list is enough,
/// since the requests below use only these.
const WORDS: [&str; 7] = [
    "Patient",
    "Observation",
    "MedicationOrder",
    "_search",
    "_history",
    "$everything",
    "metadata",
];

fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// A random path of FHIR words and canary segments shaped like FHIR words.
fn random_path(next: &mut impl FnMut() -> u64) -> String {
    let alphabet = b"ABZabz09-._~$:@!*+,='";
    let mut path = String::new();
    for _ in 0..1 + next() % 5 {
        path.push('/');
        let pick = next() % 7;
        if pick == 0 {
            path.push_str(WORDS[(next() % WORDS.len() as u64) as usize]);
            continue;
        }
        path.push_str(["", "_", "$", "P", "_P", "$P", "x."][pick as usize]);
        path.push_str(CANARY);
        for _ in 0..next() % 6 {
            path.push(char::from(
                alphabet[(next() % alphabet.len() as u64) as usize],
            ));
        }
    }
    path
}

fn request(method: &str, path: &str, bearer: Option<&str>) -> String {
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
}

#[test]
fn client_path_text_and_extension_methods_never_reach_the_audit_log() {
    let env = Env::start();
    let good = token(TENANT_A);
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    let mut sent = 0;
    for i in 0..300 {
        let path = random_path(&mut next);
        let method = match i % 10 {
            0 => "PROPFIND".to_string(),
            1 => format!("X{CANARY}"),
            _ => "GET".to_string(),
        };
        let bearer = (i % 3 != 0).then_some(good.as_str());
        let r = raw::send(env.proxy.port, request(&method, &path, bearer).as_bytes());
        assert!(r.status >= 200, "{method} {path}");
        sent += 1;
    }
    let lines = env.proxy.access_log_at_least(sent);
    let text = std::fs::read_to_string(env.proxy.dir.path().join("access.log")).unwrap();
    assert!(!text.contains(CANARY), "the canary reached the audit log");
    for line in &lines {
        let method = line["method"].as_str().unwrap();
        assert!(matches!(method, "GET" | "OTHER"), "{line}");
        let route = line["route"].as_str().unwrap();
        if route.starts_with('{') {
            continue;
        }
        for seg in route.split('/').skip(1) {
            assert!(
                matches!(seg, "{id}" | "{other}" | "") || WORDS.contains(&seg),
                "{line}"
            );
        }
    }
    // The run did reach the upstream with some of these paths (the log is not empty of successes).
    assert!(lines.iter().any(|l| l["status"] == 200));
}

#[test]
fn ids_shaped_like_keywords_or_type_names_are_placeholders_in_the_audit_log() {
    let env = Env::start();
    let good = token(TENANT_A);
    for path in ["/Patient/_john.smith@x.org", "/Patient/1/Smith"] {
        raw::send(env.proxy.port, request("GET", path, Some(&good)).as_bytes());
    }
    let lines = env.proxy.access_log_at_least(2);
    let routes: Vec<&str> = lines.iter().filter_map(|l| l["route"].as_str()).collect();
    assert!(routes.contains(&"/Patient/{id}"), "{routes:?}");
    assert!(routes.contains(&"/Patient/{id}/{other}"), "{routes:?}");
    let text = std::fs::read_to_string(env.proxy.dir.path().join("access.log")).unwrap();
    assert!(!text.contains("john") && !text.contains("Smith"), "{text}");
}
