//! A throwaway PostgreSQL cluster (Debian's `postgresql` package): `initdb` in a temporary directory,
//! started on a free loopback port with its socket in that directory, stopped and deleted when dropped.
//! Never the system service, never port 5432 blindly. As root, the server runs as the `postgres` user
//! (initdb refuses root). If PostgreSQL is not installed or does not start, the test fails: `scripts/setup`
//! installs it.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use tempfile::TempDir;

use super::ports::free_port;

pub struct Postgres {
    pub port: u16,
    dir: TempDir,
    bin: PathBuf,
    as_postgres: bool,
    /// Serve TLS with the test certificate (`tests/fixtures/tls`, for 127.0.0.1 and localhost).
    tls: bool,
}

/// The newest installed server's binaries.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .unwrap_or_else(|e| {
            panic!("PostgreSQL is not installed (/usr/lib/postgresql: {e}); run scripts/setup")
        })
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, b)| b)
        .expect("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin; run scripts/setup")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Postgres {
    /// A fresh cluster with a database `fhir_edge`; the superuser is `postgres` (trust auth on
    /// loopback), and the role `edge` (password `edge-secret`) owns the database.
    pub fn start() -> Postgres {
        Postgres::start_with(false)
    }

    /// As [`Postgres::start`], also offering TLS with the test certificate (signed by
    /// `tests/fixtures/tls/ca.pem`).
    pub fn start_tls() -> Postgres {
        Postgres::start_with(true)
    }

    fn start_with(tls: bool) -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("fhir-edge-pg-")
            .tempdir()
            .unwrap();
        let as_postgres = is_root();
        let pg = Postgres {
            port: 0,
            dir,
            bin: bin_dir(),
            as_postgres,
            tls,
        };
        if tls {
            // The server refuses a key file that others can read.
            let fixtures =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
            for f in ["cert.pem", "key.pem"] {
                std::fs::copy(fixtures.join(f), pg.dir.path().join(f)).unwrap();
            }
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                pg.dir.path().join("key.pem"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
        }
        if as_postgres {
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres:")
                .arg(pg.dir.path()));
        }
        let out = pg.command("initdb", |c| {
            c.arg("-D")
                .arg(pg.data())
                .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
                .arg("--locale=C.UTF-8");
        });
        assert!(out.status.success(), "initdb failed: {}", text(&out));
        let mut pg = pg;
        for attempt in 0..5 {
            pg.port = free_port();
            if pg.try_start() {
                break;
            }
            assert!(attempt < 4, "PostgreSQL did not start:\n{}", pg.log());
        }
        pg.psql_as(
            "postgres",
            "postgres",
            "CREATE ROLE edge LOGIN PASSWORD 'edge-secret'",
        );
        pg.psql_as(
            "postgres",
            "postgres",
            "CREATE DATABASE fhir_edge OWNER edge",
        );
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str, args: impl FnOnce(&mut Command)) -> Output {
        let path = self.bin.join(program);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        // runuser keeps the working directory: one the postgres user can enter.
        c.current_dir(self.dir.path());
        args(&mut c);
        c.output().unwrap()
    }

    fn try_start(&self) -> bool {
        let out = self.command("pg_ctl", |c| {
            c.arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.path().join("pg.log"))
                .args(["-w", "-t", "30", "-o"])
                .arg(format!(
                    "-p {} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200{tls}",
                    self.port,
                    d = self.dir.path().display(),
                    tls = if self.tls {
                        format!(
                            " -c ssl=on -c ssl_cert_file={d}/cert.pem -c ssl_key_file={d}/key.pem",
                            d = self.dir.path().display()
                        )
                    } else {
                        String::new()
                    }
                ))
                .arg("start");
        });
        out.status.success()
    }

    /// Stops the server (fast shutdown: sessions end at once), as a database outage.
    pub fn stop(&self) {
        let out = self.command("pg_ctl", |c| {
            c.arg("-D")
                .arg(self.data())
                .args(["-m", "fast", "-w", "stop"]);
        });
        assert!(out.status.success(), "pg_ctl stop failed: {}", text(&out));
    }

    /// Starts the stopped server again on the same port.
    pub fn restart(&self) {
        assert!(
            self.try_start(),
            "PostgreSQL did not restart:\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pg.log")).unwrap_or_default()
    }

    /// The URL of database `fhir_edge` as `user` (`edge`'s password is in it; others trust),
    /// without TLS.
    pub fn url(&self, user: &str) -> String {
        self.url_with(user, "disable")
    }

    /// The same with `sslmode` (`disable`, `prefer`, `require`).
    pub fn url_with(&self, user: &str, sslmode: &str) -> String {
        let password = if user == "edge" { ":edge-secret" } else { "" };
        format!(
            "postgresql://{user}{password}@127.0.0.1:{}/fhir_edge?sslmode={sslmode}",
            self.port
        )
    }

    /// Runs SQL with `psql` as `user` in `db`; returns its unaligned output; panics on an error.
    pub fn psql_as(&self, user: &str, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                user,
                "-d",
                db,
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-tA", "-c", sql])
            .env("PGPASSWORD", "edge-secret")
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {sql:?} failed: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs SQL in `fhir_edge` as the superuser.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_as("postgres", "fhir_edge", sql)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.command("pg_ctl", |c| {
            c.arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "stop"]);
        });
    }
}

fn run(c: &mut Command) {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{c:?} failed: {}", text(&out));
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `f` every 10 ms until it holds or `limit` passes; returns how long it took.
pub fn time_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = std::time::Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
