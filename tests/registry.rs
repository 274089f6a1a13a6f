//! The shared client registry in PostgreSQL: a throwaway cluster, real fhir-edge replicas on one
//! database, the CLI, and changes that must reach every replica within a second.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use crate::support::pg::{time_until, Postgres};
use crate::support::proxy::fixture;
use crate::support::{client, Client, Proxy, ProxyConfig, StubUpstream, TENANT_A};

const SECOND: Duration = Duration::from_secs(1);

/// A database and the upstreams replicas route to.
struct Fleet {
    pg: Postgres,
    meta: StubUpstream,
    a: StubUpstream,
}

impl Fleet {
    /// A cluster with the schema migrated (by the CLI, as an operator would).
    fn start() -> Fleet {
        let fleet = Fleet::unmigrated();
        let out = fleet.db_cli(&["migrate"]);
        assert!(out.status.success(), "db migrate: {}", stderr(&out));
        fleet
    }

    fn unmigrated() -> Fleet {
        Fleet::with_database(Postgres::start())
    }

    fn with_database(pg: Postgres) -> Fleet {
        let meta = StubUpstream::start("meta");
        meta.set_response(
            &[("Content-Type", "application/fhir+json")],
            crate::support::capability_statement(&meta.url("/fhir")),
        );
        Fleet {
            pg,
            meta,
            a: StubUpstream::start("tenant-a"),
        }
    }

    fn config(&self, user: &str) -> ProxyConfig {
        let routes =
            crate::support::proxy::routes_yaml(&[(TENANT_A, "tenant-a", &self.a.url("/r4"), "")]);
        let mut cfg = ProxyConfig::new(self.meta.url("/fhir"), routes);
        cfg.token = Some(format!(
            "  signing_key: {}\n  issuer: \"https://edge.fleet.test\"\n  audience: \"https://edge.fleet.test/\"\n  lifetime_seconds: 300\n  clients: {{ store: postgres, resync_seconds: 60 }}\n  failed_auth: {{ per_client: 100000, per_source: 100000, window_seconds: 60 }}\n",
            fixture("keys/signing-es256.pem").display()
        ));
        cfg.top = "database:\n  url_env: TEST_DATABASE_URL\n  connect_timeout_seconds: 2\n  query_timeout_seconds: 2\n".into();
        cfg.env = vec![("TEST_DATABASE_URL".into(), self.pg.url(user))];
        cfg
    }

    /// A replica. A fleet's replicas share one public URL behind their load balancer; here each has
    /// its own port, so the token endpoint's issuer and audience are set to one name for all.
    fn replica(&self) -> Proxy {
        Proxy::start(self.config("edge"))
    }

    /// A config file (and nothing else) naming the database, for the CLI.
    fn cli_config(&self) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("fhir-edge.yaml"),
            "database:\n  url_env: TEST_DATABASE_URL\n  connect_timeout_seconds: 2\n",
        )
        .unwrap();
        dir
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        let dir = self.cli_config();
        Command::new(env!("CARGO_BIN_EXE_fhir-edge"))
            .args(args)
            .arg("--config")
            .arg(dir.path().join("fhir-edge.yaml"))
            .env("TEST_DATABASE_URL", self.pg.url("edge"))
            .output()
            .unwrap()
    }

    fn db_cli(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["db"];
        all.extend(args);
        self.cli(&all)
    }

    /// `fhir-edge clients --store postgres --json ARGS…`, which must succeed.
    fn clients(&self, args: &[&str]) -> Value {
        let mut all = vec!["clients", "--store", "postgres", "--json"];
        all.extend(args);
        let out = self.cli(&all);
        assert!(out.status.success(), "clients {args:?}: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn add_client(&self, name: &str) -> Client {
        Client::from_cli(&self.clients(&["add", "--name", name, "--tenant", TENANT_A]))
    }
}

fn stderr(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// POST /token on `p` with client_secret_post: the status and the body.
fn token(p: &Proxy, id: &str, secret: &str) -> (u16, Value) {
    let r = client()
        .post(p.url("/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=client_credentials&client_id={id}&client_secret={secret}&scope={TENANT_A}"
        ))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn token_status(p: &Proxy, c: &Client) -> u16 {
    token(p, &c.id, &c.secret).0
}

fn access_token(p: &Proxy, c: &Client) -> String {
    let (status, body) = token(p, &c.id, &c.secret);
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_string()
}

fn fhir_status(p: &Proxy, token: &str) -> u16 {
    crate::support::status_with_token(p, "/Patient/1", token).0
}

/// A self-service request on `p`, authenticated as `c`: the status, the `Retry-After` and the body.
fn manage(p: &Proxy, method: &str, path: &str, c: &Client) -> (u16, Option<String>, Value) {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.id, c.secret));
    let r = client()
        .request(method.parse().unwrap(), p.url(path))
        .header("authorization", format!("Basic {basic}"))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry, r.json().unwrap_or(Value::Null))
}

/// A new secret for `c` through `p`'s self-service endpoint.
fn rotate_on(p: &Proxy, c: &Client) -> Client {
    let (status, _, body) = manage(p, "POST", &format!("/register/{}/secrets", c.id), c);
    assert_eq!(status, 201, "{body}");
    Client {
        id: c.id.clone(),
        secret: body["client_secret"].as_str().unwrap().to_string(),
        secret_id: body["client_secret_id"].as_str().unwrap().to_string(),
    }
}

fn metric(p: &Proxy, name: &str) -> Option<f64> {
    p.admin("/metrics")
        .1
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn the_schema_is_migrated_by_the_cli_and_checked_at_start() {
    let fleet = Fleet::unmigrated();
    // Not migrated: a replica refuses to start and says what to do.
    let err = Proxy::try_start(fleet.config("edge"))
        .err()
        .expect("started on an empty database");
    assert!(err.contains("fhir-edge db migrate"), "{err}");
    let status = fleet.db_cli(&["status"]);
    assert!(!status.status.success());
    assert!(
        stderr(&status).contains("fhir-edge db migrate"),
        "{}",
        stderr(&status)
    );

    let first = fleet.db_cli(&["migrate"]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(
        stderr(&first).contains("applied migration 1, 2"),
        "{}",
        stderr(&first)
    );
    let again = fleet.db_cli(&["migrate"]);
    assert!(stderr(&again).contains("up to date"), "{}", stderr(&again));
    let status = fleet.db_cli(&["status"]);
    assert!(
        stderr(&status).contains("schema version 2, 0 clients"),
        "{}",
        stderr(&status)
    );
    // The tables' owner's password never shows in any output.
    for out in [&first, &again, &status] {
        assert!(!stderr(out).contains("edge-secret"));
    }

    // A schema newer than this build: refused at start, clearly.
    fleet
        .pg
        .psql("INSERT INTO fhir_edge_schema (version, name) VALUES (99, 'from the future')");
    let err = Proxy::try_start(fleet.config("edge"))
        .err()
        .expect("started on a newer schema");
    assert!(err.contains("newer than this build"), "{err}");
    assert!(!err.contains("edge-secret"), "{err}");
}

#[test]
fn three_replicas_see_a_rotation_and_a_revocation_within_a_second() {
    let fleet = Fleet::start();
    let old = fleet.add_client("Teams");
    let (a, b, c) = (fleet.replica(), fleet.replica(), fleet.replica());
    for p in [&a, &b, &c] {
        assert_eq!(token_status(p, &old), 200);
    }
    // `fhir-edge check` on a replica's config reaches the database and counts its clients.
    let check = Command::new(env!("CARGO_BIN_EXE_fhir-edge"))
        .args(["check", "--config"])
        .arg(a.dir.path().join("fhir-edge.yaml"))
        .env("TEST_DATABASE_URL", fleet.pg.url("edge"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(
        stderr(&check).contains("schema version 2, 1 clients"),
        "{}",
        stderr(&check)
    );
    let old_token = access_token(&c, &old);
    assert_eq!(fhir_status(&a, &old_token), 200);

    // Rotated through A: usable on A at once, on B and C within a second.
    let new = rotate_on(&a, &old);
    assert_eq!(token_status(&a, &new), 200);
    for p in [&b, &c] {
        assert!(
            time_until(SECOND, || token_status(p, &new) == 200).is_some(),
            "the rotated secret did not reach another replica within 1 s"
        );
    }
    // The old secret revoked through B (authenticated with the new one): refused at /token and its
    // tokens refused on the FHIR path of A and C within a second.
    let (status, _, _) = manage(
        &b,
        "DELETE",
        &format!("/register/{}/secrets/{}", old.id, old.secret_id),
        &new,
    );
    assert_eq!(status, 204);
    for p in [&a, &c] {
        assert!(
            time_until(SECOND, || token_status(p, &old) == 401
                && fhir_status(p, &old_token) == 401)
            .is_some(),
            "the revocation did not reach another replica within 1 s"
        );
        assert_eq!(token_status(p, &new), 200);
    }

    // A change made by hand in SQL reaches the replicas too (the triggers notify).
    let new_token = access_token(&a, &new);
    fleet.pg.psql(&format!(
        "UPDATE fhir_edge_clients SET disabled = true WHERE client_id = '{}'",
        new.id
    ));
    for p in [&a, &b, &c] {
        assert!(
            time_until(SECOND, || fhir_status(p, &new_token) == 401).is_some(),
            "disabling in SQL did not reach a replica within 1 s"
        );
    }
    assert!(metric(&a, "fhir_edge_registry_changes_applied_total").unwrap() >= 3.0);
    assert_eq!(metric(&b, "fhir_edge_registry_connected"), Some(1.0));
}

#[test]
fn a_database_outage_keeps_tokens_flowing_and_refuses_writes_clearly() {
    let fleet = Fleet::start();
    let c = fleet.add_client("Teams");
    let (a, b) = (fleet.replica(), fleet.replica());
    let before = access_token(&a, &c);

    fleet.pg.stop();
    assert!(
        time_until(Duration::from_secs(10), || metric(
            &a,
            "fhir_edge_registry_connected"
        ) == Some(0.0))
        .is_some(),
        "replica A did not notice the outage"
    );
    // Proxying, verification and issuance for existing clients go on from the snapshot.
    assert_eq!(fhir_status(&a, &before), 200);
    let during = access_token(&b, &c);
    assert_eq!(fhir_status(&a, &during), 200);
    // Writes fail with a 503 and an OAuth error body; the CLI exits non-zero with a message.
    let (status, retry, body) = manage(&a, "POST", &format!("/register/{}/secrets", c.id), &c);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "temporarily_unavailable");
    assert!(retry.is_some());
    let out = fleet.cli(&["clients", "--store", "postgres", "rotate", &c.id]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unavailable"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("edge-secret"));
    assert!(!a.logs().contains("edge-secret"));
    assert!(metric(&a, "fhir_edge_registry_write_failures_total").unwrap() >= 1.0);
    let (_, ready) = a.admin("/readyz");
    assert!(ready.contains("ready"), "{ready}");

    // Back: writes work without a restart and every replica converges.
    fleet.pg.restart();
    let mut rotated = None;
    assert!(
        time_until(Duration::from_secs(15), || {
            let (status, _, body) = manage(&a, "POST", &format!("/register/{}/secrets", c.id), &c);
            if status == 201 {
                rotated = Some(Client {
                    id: c.id.clone(),
                    secret: body["client_secret"].as_str().unwrap().to_string(),
                    secret_id: body["client_secret_id"].as_str().unwrap().to_string(),
                });
            }
            status == 201
        })
        .is_some(),
        "writes did not resume after the database came back"
    );
    let rotated = rotated.unwrap();
    assert!(
        time_until(Duration::from_secs(10), || token_status(&b, &rotated)
            == 200)
        .is_some()
    );
    assert_eq!(metric(&b, "fhir_edge_registry_connected"), Some(1.0));
    assert!(metric(&b, "fhir_edge_registry_resyncs_total").unwrap() >= 2.0);
}

#[test]
fn concurrent_revocations_on_two_replicas_never_remove_the_last_secret() {
    let fleet = Fleet::start();
    let (a, b) = (fleet.replica(), fleet.replica());
    for _ in 0..8 {
        let first = fleet.add_client("racer");
        let second = Client::from_cli(&fleet.clients(&["rotate", &first.id]));
        // Wait until both replicas know the second secret.
        for p in [&a, &b] {
            assert!(time_until(SECOND * 2, || token_status(p, &second) == 200).is_some());
        }
        // Each replica is asked to delete the other secret, at the same moment.
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let statuses: Vec<u16> = std::thread::scope(|s| {
            let jobs = [(&a, &first, &second), (&b, &second, &first)].map(|(p, auth, victim)| {
                let barrier = barrier.clone();
                s.spawn(move || {
                    barrier.wait();
                    manage(
                        p,
                        "DELETE",
                        &format!("/register/{}/secrets/{}", victim.id, victim.secret_id),
                        auth,
                    )
                    .0
                })
            });
            jobs.map(|j| j.join().unwrap()).to_vec()
        });
        let mut sorted = statuses.clone();
        sorted.sort();
        // One wins; the other finds the client's last secret (409) or has lost its own credentials
        // to the first (401): never both deleted.
        assert_eq!(sorted[0], 204, "{statuses:?}");
        assert!(sorted[1] == 409 || sorted[1] == 401, "{statuses:?}");
        let count = fleet.pg.psql(&format!(
            "SELECT count(*) FROM fhir_edge_client_secrets WHERE client_id = '{}'",
            first.id
        ));
        assert_eq!(count, "1", "{statuses:?}");
    }
}

#[test]
fn a_hundred_rotations_under_load_lose_nothing() {
    let fleet = Fleet::start();
    let original = fleet.add_client("busy");
    let replicas = [fleet.replica(), fleet.replica(), fleet.replica()];
    let bearer = access_token(&replicas[0], &original);
    let stop = AtomicBool::new(false);
    let served = AtomicUsize::new(0);
    let mut delays = Vec::new();
    let mut secrets = Vec::new();
    std::thread::scope(|s| {
        for p in &replicas {
            let (stop, served, bearer) = (&stop, &served, &bearer);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(fhir_status(p, bearer), 200);
                    served.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        for i in 0..100 {
            let (via, others) = (
                &replicas[i % 3],
                [&replicas[(i + 1) % 3], &replicas[(i + 2) % 3]],
            );
            let fresh = rotate_on(via, &original);
            for p in others {
                let took = time_until(Duration::from_secs(5), || token_status(p, &fresh) == 200)
                    .expect("a rotation never reached another replica");
                delays.push(took);
            }
            secrets.push(fresh);
        }
        stop.store(true, Ordering::Relaxed);
    });
    // Every one of the 100 secrets is in the database and works on every replica: no lost update.
    let count = fleet.pg.psql(&format!(
        "SELECT count(*) FROM fhir_edge_client_secrets WHERE client_id = '{}'",
        original.id
    ));
    assert_eq!(count, "101");
    for (i, s) in secrets.iter().enumerate() {
        assert_eq!(token_status(&replicas[i % 3], s), 200);
    }
    delays.sort();
    let p = |q: f64| delays[((delays.len() as f64 * q) as usize).min(delays.len() - 1)];
    eprintln!(
        "100 rotations, {} FHIR requests served meanwhile; propagation to the other replicas (as seen by a polling client): p50 {:?}, p99 {:?}, max {:?}",
        served.load(Ordering::Relaxed),
        p(0.5),
        p(0.99),
        delays.last().unwrap()
    );
    assert!(served.load(Ordering::Relaxed) > 100);
}

#[test]
fn a_read_only_role_serves_tokens_and_refuses_writes() {
    let fleet = Fleet::start();
    let c = fleet.add_client("Teams");
    fleet.pg.psql("CREATE ROLE reader LOGIN");
    fleet.pg.psql(
        "GRANT SELECT ON fhir_edge_schema, fhir_edge_clients, fhir_edge_client_secrets TO reader",
    );
    let replica = Proxy::start(fleet.config("reader"));
    let bearer = access_token(&replica, &c);
    assert_eq!(fhir_status(&replica, &bearer), 200);
    let (status, _, body) = manage(&replica, "POST", &format!("/register/{}/secrets", c.id), &c);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "temporarily_unavailable");
    // A change made elsewhere still reaches it.
    let rotated = Client::from_cli(&fleet.clients(&["rotate", &c.id]));
    assert!(time_until(SECOND, || token_status(&replica, &rotated) == 200).is_some());
}

#[test]
fn a_registry_moves_between_file_and_database_with_secrets_hashed() {
    let fleet = Fleet::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("clients.yaml");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fhir-edge"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null)
    };
    let f = file.to_str().unwrap();
    // A name with SQL in it is stored as data.
    let name = "x'); DROP TABLE fhir_edge_clients; --";
    let filed = Client::from_cli(&run(&[
        "clients",
        "--file",
        f,
        "--json",
        "add",
        "--name",
        name,
        "--all-tenants",
    ]));
    fleet.clients(&["import", f]);
    // An id present already is refused, and nothing is written.
    let out = fleet.cli(&["clients", "--store", "postgres", "import", f]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("exists already"), "{}", stderr(&out));

    let listed = fleet.clients(&["list"]);
    assert_eq!(listed[0]["client_id"], filed.id.as_str());
    assert_eq!(listed[0]["name"], name);
    let stored = fleet
        .pg
        .psql("SELECT string_agg(hash, ',') FROM fhir_edge_client_secrets");
    assert!(stored.starts_with("sha256:") && !stored.contains(&filed.secret));

    // The imported secret works on a replica of the database.
    let replica = fleet.replica();
    assert_eq!(token_status(&replica, &filed), 200);

    // Export to a file and serve that file: the same client, the same secret.
    let back = dir.path().join("exported.yaml");
    let out = fleet.cli(&[
        "clients",
        "--store",
        "postgres",
        "export",
        "--out",
        back.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&back).unwrap();
    assert!(text.contains(&filed.id) && !text.contains(&filed.secret));
    let listed = run(&[
        "clients",
        "--file",
        back.to_str().unwrap(),
        "--json",
        "list",
    ]);
    assert_eq!(listed[0]["secrets"][0]["id"], filed.secret_id.as_str());

    // --replace makes the database exactly the file.
    let other = fleet.add_client("other");
    fleet.clients(&["import", "--replace", back.to_str().unwrap()]);
    let ids: Vec<String> = fleet
        .clients(&["list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec![filed.id.clone()]);
    assert!(time_until(SECOND, || token_status(&replica, &other) == 401).is_some());
}

#[test]
fn tls_to_the_database_is_verified() {
    let fleet = Fleet::with_database(Postgres::start_tls());
    assert!(fleet.db_cli(&["migrate"]).status.success());
    let c = fleet.add_client("Teams");
    // sslmode=require with the test CA: the replica connects over TLS and serves.
    let mut cfg = fleet.config("edge");
    cfg.top = format!(
        "database:\n  url_env: TEST_DATABASE_URL\n  ca_file: {}\n",
        fixture("tls/ca.pem").display()
    );
    cfg.env = vec![(
        "TEST_DATABASE_URL".into(),
        fleet.pg.url_with("edge", "require"),
    )];
    let replica = Proxy::start(cfg);
    assert_eq!(token_status(&replica, &c), 200);
    let encrypted = fleet.pg.psql(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'fhir-edge' AND s.ssl",
    );
    assert_ne!(encrypted, "0", "no fhir-edge connection uses TLS");
    // Without the CA the server's certificate is not trusted: no connection, a clear error.
    let mut cfg = fleet.config("edge");
    cfg.env = vec![(
        "TEST_DATABASE_URL".into(),
        fleet.pg.url_with("edge", "require"),
    )];
    let untrusted = Proxy::start(cfg);
    let (status, body) = token(&untrusted, &c.id, &c.secret);
    assert_eq!(status, 503, "{body}");
    let (ready, why) = untrusted.admin("/readyz");
    assert_eq!(ready, 503);
    assert!(why.contains("not been read from the database"), "{why}");
    assert!(
        untrusted.logs().to_lowercase().contains("certificate"),
        "{}",
        untrusted.logs()
    );
}
