//! The command line: `check` (every shipped config passes; broken files fail with file:line and key
//! path) and `keygen`.

use std::path::Path;
use std::process::Command;

fn check(config: &Path) -> (bool, String) {
    check_with(config, &[])
}

fn check_with(config: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fhir-edge"))
        .args(["check", "--config"])
        .arg(config)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn every_shipped_config_passes_check() {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut checked = 0;
    for entry in std::fs::read_dir(&conf).unwrap() {
        let p = entry.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        // Only the static configs (they name the routing table); routes files are checked through them.
        if p.extension().is_some_and(|e| e == "yaml") && text.contains("routes_file:") {
            let (ok, out) = check(&p);
            assert!(ok, "{}: {out}", p.display());
            assert!(out.contains("ok"), "{out}");
            checked += 1;
        }
    }
    assert!(checked >= 1);
}

#[test]
fn check_reports_every_problem_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("fhir-edge.yaml");
    std::fs::write(
        &cfg,
        "listen: [\"nope\"]\npublic_base_url: \"ftp://x\"\nroutes_file: routes.yaml\nmetadata_upstream: \"http://127.0.0.1:1\"\nauth:\n  issuers:\n    - issuer: i\n      audience: a\n      tenants: any\n      keys:\n        - { alg: HS256, secret_file: short.secret }\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("short.secret"), "too-short").unwrap();
    let (ok, out) = check(&cfg);
    assert!(!ok);
    assert!(
        out.contains("fhir-edge.yaml:1:") && out.contains("listen[0]"),
        "{out}"
    );
    assert!(
        out.contains("fhir-edge.yaml:2:") && out.contains("public_base_url"),
        "{out}"
    );
    assert!(out.contains("at least 32 bytes"), "{out}");

    // A valid config with a broken routing table.
    std::fs::write(
        &cfg,
        "listen: [\"127.0.0.1:1\"]\npublic_base_url: \"http://x\"\nroutes_file: routes.yaml\nmetadata_upstream: \"http://127.0.0.1:1\"\nauth:\n  issuers:\n    - issuer: i\n      audience: a\n      tenants: any\n      keys:\n        - { alg: HS256, secret_file: long.secret }\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("long.secret"), "x".repeat(40)).unwrap();
    std::fs::write(
        dir.path().join("routes.yaml"),
        "tenants:\n  145f4184-1b0b-41c7-ba24-b3c1291bfda1:\n    name: a\n    upstream: http://127.0.0.1:1\n    colour: red\n",
    )
    .unwrap();
    let (ok, out) = check(&cfg);
    assert!(!ok);
    assert!(
        out.contains("routes.yaml:5:") && out.contains("colour"),
        "{out}"
    );
}

#[test]
fn keygen_writes_a_private_key_file_that_the_token_endpoint_loads() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    for alg in ["ES256", "RS256"] {
        let out = dir.path().join(format!("{alg}.pem"));
        let run = || {
            Command::new(env!("CARGO_BIN_EXE_fhir-edge"))
                .args(["keygen", "--alg", alg, "--out"])
                .arg(&out)
                .output()
                .unwrap()
        };
        let first = run();
        assert!(
            first.status.success(),
            "{}",
            String::from_utf8_lossy(&first.stderr)
        );
        let printed = String::from_utf8_lossy(&first.stdout).into_owned();
        let meta = std::fs::metadata(&out).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{alg} key is not private"
        );
        let pem = std::fs::read_to_string(&out).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8 PEM");
        let key = fhir_edge::internals::token::keys::SigningKey::from_pem(&pem).unwrap();
        assert!(
            printed.contains(&key.kid),
            "the printed kid is the key's thumbprint: {printed}"
        );
        // Never overwrites.
        let second = run();
        assert!(!second.status.success());
        assert_eq!(std::fs::read_to_string(&out).unwrap(), pem);
    }
}

#[test]
fn check_offline_resolves_no_host_names_but_checks_everything_else() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("fhir-edge.yaml");
    let keys = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys");
    // `.invalid` never resolves (RFC 6761): only an offline check can pass.
    std::fs::write(
        &cfg,
        format!(
            "listen: [\"127.0.0.1:8080\"]\npublic_base_url: \"https://edge.example/fhir\"\nroutes_file: routes.yaml\nmetadata_upstream: \"https://meta.example.invalid/r4\"\nauth:\n  issuers:\n    - issuer: i\n      audience: a\n      tenants: any\n      keys:\n        - {{ alg: ES256, public_key_file: {}/es256.pub.pem }}\n",
            keys.display()
        ),
    )
    .unwrap();
    let routes = dir.path().join("routes.yaml");
    let good = "tenants:\n  145f4184-1b0b-41c7-ba24-b3c1291bfda1:\n    name: a\n    upstream: \"https://fhir.hospital-a.invalid/r4\"\n";
    std::fs::write(&routes, good).unwrap();

    let (ok, out) = check_with(&cfg, &["--offline"]);
    assert!(ok, "offline check failed: {out}");
    let (ok, out) = check(&cfg);
    assert!(!ok, "an unresolvable host passed the online check: {out}");
    assert!(out.contains("resolve"), "{out}");

    // Offline still refuses what is wrong with the file itself.
    std::fs::write(&routes, good.replace("name: a", "name: a\n    name: b")).unwrap();
    let (ok, out) = check_with(&cfg, &["--offline"]);
    assert!(!ok, "a duplicate key passed the offline check: {out}");
}
