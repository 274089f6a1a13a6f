//! The client lifecycle: the CLI against a running proxy, rotation with overlap, revocation,
//! disabling, and the clients' own self-service endpoint (modelled on RFC 7592).

use serde_json::Value;

use crate::support::proxy::default_token_section;
use crate::support::{client, Client, Env, TENANT_A, TENANT_B};

fn env() -> Env {
    Env::start_with(|c| c.token = Some(default_token_section()))
}

fn token_status(env: &Env, c: &Client) -> u16 {
    env.token_request(
        &format!(
            "grant_type=client_credentials&client_id={}&client_secret={}&scope={TENANT_A}",
            c.id, c.secret
        ),
        None,
    )
    .status()
    .as_u16()
}

#[test]
fn cli_round_trip_against_a_running_proxy() {
    let env = env();
    let added = env.proxy.clients_cli(&[
        "add",
        "--name",
        "teams",
        "--tenant",
        TENANT_A,
        "--tenant",
        &TENANT_B.to_uppercase(),
    ]);
    let c = Client::from_cli(&added);
    assert_eq!(
        added["allowed_tenants"],
        serde_json::json!([TENANT_A, TENANT_B])
    );
    // The running proxy picked the new client up.
    assert!(crate::support::eventually(
        std::time::Duration::from_secs(3),
        || token_status(&env, &c) == 200
    ));
    // The file holds a hash, never the secret; `list` never shows it either.
    let file = std::fs::read_to_string(env.proxy.clients_path()).unwrap();
    assert!(file.contains(&c.id) && !file.contains(&c.secret));
    let list = env.proxy.clients_cli(&["list"]);
    assert_eq!(list[0]["client_id"], c.id.as_str());
    assert_eq!(list[0]["secrets"][0]["id"], c.secret_id.as_str());
    assert!(!list.to_string().contains(&c.secret));
    // Remove: its tokens stop working on the next request.
    let t = env.token_for(&c, TENANT_A);
    assert_eq!(env.fhir_status("/Patient/1", &t), 200);
    let before = env.clients_reloads();
    env.proxy.clients_cli(&["remove", &c.id]);
    env.await_clients_reload(before);
    assert_eq!(env.fhir_status("/Patient/1", &t), 401);
    assert_eq!(token_status(&env, &c), 401);
}

#[test]
fn rotation_overlaps_then_revoking_the_old_secret_ends_it_and_its_tokens() {
    let env = env();
    let old = env.add_client("teams", &[TENANT_A]);
    let old_token = env.token_for(&old, TENANT_A);
    let before = env.clients_reloads();
    let rotated = env.proxy.clients_cli(&["rotate", &old.id]);
    env.await_clients_reload(before);
    let new = Client::from_cli(&rotated);
    assert_eq!(new.id, old.id);
    assert_ne!(new.secret, old.secret);
    // Overlap: both secrets work, and the old token still does.
    assert_eq!(token_status(&env, &old), 200);
    assert_eq!(token_status(&env, &new), 200);
    assert_eq!(env.fhir_status("/Patient/1", &old_token), 200);
    let new_token = env.token_for(&new, TENANT_A);

    let before = env.clients_reloads();
    env.proxy
        .clients_cli(&["revoke-secret", &old.id, &old.secret_id]);
    env.await_clients_reload(before);
    assert_eq!(
        token_status(&env, &old),
        401,
        "the revoked secret still gets tokens"
    );
    assert_eq!(
        env.fhir_status("/Patient/1", &old_token),
        401,
        "a token minted with the revoked secret still works"
    );
    assert_eq!(token_status(&env, &new), 200);
    assert_eq!(env.fhir_status("/Patient/1", &new_token), 200);
    let r = client()
        .get(env.proxy.url("/Patient/1"))
        .header("authorization", format!("Bearer {old_token}"))
        .send()
        .unwrap();
    assert_eq!(
        r.headers()["www-authenticate"],
        r#"Bearer realm="fhir-edge", error="invalid_token""#
    );
}

#[test]
fn rotate_with_keep_old_sets_an_expiry_on_the_old_secret() {
    let env = env();
    let old = env.add_client("teams", &[TENANT_A]);
    env.proxy
        .clients_cli(&["rotate", &old.id, "--keep-old", "1h"]);
    let list = env.proxy.clients_cli(&["list"]);
    let secrets = list[0]["secrets"].as_array().unwrap();
    assert_eq!(secrets.len(), 2);
    let old_entry = secrets
        .iter()
        .find(|s| s["id"] == old.secret_id.as_str())
        .unwrap();
    assert!(old_entry["expires"].is_string(), "{old_entry}");
    assert_eq!(old_entry["live"], true);
    let new_entry = secrets
        .iter()
        .find(|s| s["id"] != old.secret_id.as_str())
        .unwrap();
    assert!(new_entry["expires"].is_null());
}

#[test]
fn a_disabled_client_gets_no_tokens_and_its_tokens_stop_working() {
    let env = env();
    let c = env.add_client("teams", &[TENANT_A]);
    let t = env.token_for(&c, TENANT_A);
    let before = env.clients_reloads();
    env.proxy.clients_cli(&["disable", &c.id]);
    env.await_clients_reload(before);
    assert_eq!(env.fhir_status("/Patient/1", &t), 401);
    assert_eq!(token_status(&env, &c), 401);
    let before = env.clients_reloads();
    env.proxy.clients_cli(&["enable", &c.id]);
    env.await_clients_reload(before);
    assert_eq!(env.fhir_status("/Patient/1", &t), 200);
}

#[test]
fn taking_a_tenant_from_a_client_ends_its_tokens_for_that_tenant() {
    let env = env();
    let c = env.add_client("teams", &[TENANT_A, TENANT_B]);
    let ta = env.token_for(&c, TENANT_A);
    let tb = env.token_for(&c, TENANT_B);
    let text = std::fs::read_to_string(env.proxy.clients_path()).unwrap();
    let narrowed = text.replace(&format!("    - {TENANT_B}\n"), "");
    assert_ne!(text, narrowed);
    let before = env.clients_reloads();
    std::fs::write(env.proxy.clients_path(), narrowed).unwrap();
    env.await_clients_reload(before);
    assert_eq!(env.fhir_status("/Patient/1", &ta), 200);
    assert_eq!(env.fhir_status("/Patient/1", &tb), 401);
}

fn manage(env: &Env, method: &str, path: &str, basic: (&str, &str)) -> reqwest::blocking::Response {
    client()
        .request(
            method.parse().unwrap(),
            env.proxy.url(&format!("/register/{path}")),
        )
        .basic_auth(basic.0, Some(basic.1))
        .send()
        .unwrap()
}

#[test]
fn a_client_regenerates_its_secret_and_deletes_the_old_one_itself() {
    let env = env();
    let c = env.add_client("teams", &[TENANT_A]);
    let old_token = env.token_for(&c, TENANT_A);

    let r = manage(&env, "GET", &c.id, (&c.id, &c.secret));
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let config: Value = r.json().unwrap();
    assert_eq!(config["client_id"], c.id.as_str());
    assert!(!config.to_string().contains(&c.secret));

    let r = manage(
        &env,
        "POST",
        &format!("{}/secrets", c.id),
        (&c.id, &c.secret),
    );
    assert_eq!(r.status(), 201);
    let fresh: Value = r.json().unwrap();
    let new = Client {
        id: c.id.clone(),
        secret: fresh["client_secret"].as_str().unwrap().to_string(),
        secret_id: fresh["client_secret_id"].as_str().unwrap().to_string(),
    };
    assert_eq!(
        token_status(&env, &new),
        200,
        "the new secret works at once"
    );
    assert_eq!(
        token_status(&env, &c),
        200,
        "the old one too, until deleted"
    );
    assert!(!std::fs::read_to_string(env.proxy.clients_path())
        .unwrap()
        .contains(&new.secret));

    // Delete the secret it authenticated with.
    let r = manage(
        &env,
        "DELETE",
        &format!("{}/secrets/{}", c.id, c.secret_id),
        (&c.id, &c.secret),
    );
    assert_eq!(r.status(), 204);
    assert_eq!(token_status(&env, &c), 401);
    assert_eq!(env.fhir_status("/Patient/1", &old_token), 401);
    assert_eq!(token_status(&env, &new), 200);

    // The last secret cannot go: the client would be locked out.
    let r = manage(
        &env,
        "DELETE",
        &format!("{}/secrets/{}", c.id, new.secret_id),
        (&c.id, &new.secret),
    );
    assert_eq!(r.status(), 409);
    assert_eq!(token_status(&env, &new), 200);
    // Unknown secret id: 404.
    let r = manage(
        &env,
        "DELETE",
        &format!("{}/secrets/s-nope", c.id),
        (&c.id, &new.secret),
    );
    assert_eq!(r.status(), 404);
}

#[test]
fn self_service_needs_the_clients_own_credentials() {
    let env = env();
    let a = env.add_client("a", &[TENANT_A]);
    let b = env.add_client("b", &[TENANT_A]);
    // B's credentials on A's resource, a wrong secret, none at all: the same 401 with a Basic challenge.
    for r in [
        manage(
            &env,
            "POST",
            &format!("{}/secrets", a.id),
            (&b.id, &b.secret),
        ),
        manage(
            &env,
            "POST",
            &format!("{}/secrets", a.id),
            (&a.id, "fes_wrong"),
        ),
        client()
            .post(env.proxy.url(&format!("/register/{}/secrets", a.id)))
            .send()
            .unwrap(),
    ] {
        assert_eq!(r.status(), 401);
        assert!(r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic "));
        assert_eq!(r.json::<Value>().unwrap()["error"], "invalid_client");
    }
    // Wrong method, unknown sub-resource.
    assert_eq!(manage(&env, "PUT", &a.id, (&a.id, &a.secret)).status(), 405);
    assert_eq!(
        manage(&env, "GET", &format!("{}/other", a.id), (&a.id, &a.secret)).status(),
        404
    );
    let list = env.proxy.clients_cli(&["list"]);
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["secrets"].as_array().unwrap().len() == 1));
}
