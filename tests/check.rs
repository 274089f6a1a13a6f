//! `fhir-edge check`: every shipped config passes; broken files fail with file:line and key path.

use std::path::Path;
use std::process::Command;

fn check(config: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fhir-edge"))
        .args(["check", "--config"])
        .arg(config)
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
        "listen: [\"nope\"]\npublic_base_url: \"ftp://x\"\nroutes_file: routes.yaml\nmetadata_upstream: \"http://127.0.0.1:1\"\nauth:\n  issuers:\n    - issuer: i\n      audience: a\n      keys:\n        - { alg: HS256, secret_file: short.secret }\n",
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
        "listen: [\"127.0.0.1:1\"]\npublic_base_url: \"http://x\"\nroutes_file: routes.yaml\nmetadata_upstream: \"http://127.0.0.1:1\"\nauth:\n  issuers:\n    - issuer: i\n      audience: a\n      keys:\n        - { alg: HS256, secret_file: long.secret }\n",
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
