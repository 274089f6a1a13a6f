//! fhir-edge mounted in another Pingora server (`examples/embed.rs`): the host's own service and the
//! proxy answer side by side from one process.

use std::path::PathBuf;

use crate::support::proxy::free_port;
use crate::support::{client, status_with_token, tokens::token, Env, TENANT_B};

/// `target/<profile>/examples/embed` beside this test binary (`target/<profile>/deps/integration-…`),
/// brought up to date first: `cargo test` builds examples, but a filtered `--test integration` run
/// does not.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build
        .args(["build", "--quiet", "--example", "embed"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    assert!(
        build.status().unwrap().success(),
        "cannot build the embed example"
    );
    profile_dir.join("examples/embed")
}

#[test]
fn the_embed_example_serves_the_host_service_and_proxies_by_tenant() {
    let host_port = free_port();
    let env = Env::start_with(|cfg| {
        cfg.program = Some(example_binary());
        cfg.args = vec!["--host-listen".into(), format!("127.0.0.1:{host_port}")];
    });
    let proxy = &env.proxy;

    let host = client()
        .get(format!("http://127.0.0.1:{host_port}/anything"))
        .send()
        .unwrap();
    assert_eq!(host.status().as_u16(), 200);
    assert_eq!(host.text().unwrap(), "hello from the host service\n");

    let metadata = client().get(proxy.url("/metadata")).send().unwrap();
    assert_eq!(metadata.status().as_u16(), 200, "unauthenticated /metadata");
    assert!(metadata.text().unwrap().contains("oauth-uris"));

    let (status, _) = status_with_token(proxy, "/Patient/1", &token(TENANT_B));
    assert_eq!(status, 200);
    assert_eq!(env.b.count(), 1, "tenant B's token reached B's upstream");
    assert_eq!(env.a.count(), 0, "nothing of tenant B's reached A");
    let (status, _) = status_with_token(proxy, "/Patient/1", "not-a-token");
    assert_eq!(status, 401);
    let (status, body) = proxy.admin("/metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains("fhir_edge_requests_total"),
        "the admin listener is mounted too"
    );
}
