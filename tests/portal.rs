//! The registration portal over real sockets: the real binary, a cookie-keeping HTTP client that
//! fills forms the way a browser does, the operator's CLI, and PostgreSQL for a fleet. The whole
//! journey in a real browser is tests/e2e/test_portal.py.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use reqwest::blocking::Response;

use crate::support::pg::Postgres;
use crate::support::proxy::{default_token_section, fixture};
use crate::support::{client, Env, Proxy, ProxyConfig, StubUpstream, TENANT_A, TENANT_B};

const PASSWORD: &str = "correct horse battery staple";

/// The portal section every test starts from (a low sign-in throttle so tests can trip it).
fn portal_section(extra: &str) -> String {
    format!(
        "portal:\n  path: /portal\n  state_file: portal-state.json\n  login_throttle: {{ per_account: 3, per_source: 1000, window_seconds: 60 }}\n{extra}"
    )
}

fn start(extra: &str) -> Env {
    let extra = extra.to_string();
    Env::start_with(move |cfg| {
        cfg.token = Some(default_token_section());
        cfg.top = portal_section(&extra);
    })
}

/// `fhir-edge portal … --json` against `proxy`'s config.
fn portal_cli(proxy: &Proxy, env: &[(String, String)], args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fhir-edge"))
        .arg("portal")
        .arg("--config")
        .arg(proxy.dir.path().join("fhir-edge.yaml"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap()
}

/// Invites `email` for `tenants` and returns the link's path (below the proxy's origin).
fn invite(proxy: &Proxy, env: &[(String, String)], email: &str, tenants: &[&str]) -> String {
    let mut args = vec!["--json", "invite", "--email", email];
    for t in tenants {
        args.extend(["--tenant", t]);
    }
    let out = portal_cli(proxy, env, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let link = v["link"].as_str().unwrap();
    link.split_once(&proxy.authority()).unwrap().1.to_string()
}

/// A browser's share of HTTP: cookies kept per name, forms filled with the page's CSRF token.
struct Browser {
    origin: String,
    cookies: HashMap<String, String>,
    http: reqwest::blocking::Client,
}

struct Page {
    status: u16,
    location: Option<String>,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Page {
    /// The value of the first hidden `csrf` field.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find(r#"name="csrf" value=""#)
            .expect("a csrf field")
            + 19;
        self.body[at..].split('"').next().unwrap().to_string()
    }

    /// The id of the first secret in a client page's table.
    fn first_secret_id(&self) -> String {
        let row = self.body.split("<td><code>").nth(1).expect("a secret row");
        row.split('<').next().unwrap().to_string()
    }

    /// The text of the element with `id`.
    fn by_id(&self, id: &str) -> String {
        let at = self.body.find(&format!(r#"id="{id}">"#)).expect(id) + id.len() + 6;
        self.body[at..].split('<').next().unwrap().to_string()
    }
}

impl Browser {
    fn new(origin: String) -> Browser {
        Browser {
            origin,
            cookies: HashMap::new(),
            http: client(),
        }
    }

    fn keep(&mut self, r: Response) -> Page {
        for v in r.headers().get_all("set-cookie") {
            let (pair, _) = v.to_str().unwrap().split_once(';').unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            if value.is_empty() {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.into(), value.into());
            }
        }
        Page {
            status: r.status().as_u16(),
            location: r
                .headers()
                .get("location")
                .map(|l| l.to_str().unwrap().to_string()),
            headers: r.headers().clone(),
            body: r.text().unwrap(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn get(&mut self, path: &str) -> Page {
        let r = self
            .http
            .get(format!("{}{path}", self.origin))
            .header("cookie", self.cookie_header())
            .send()
            .unwrap();
        self.keep(r)
    }

    fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let r = self
            .http
            .post(format!("{}{path}", self.origin))
            .header("cookie", self.cookie_header())
            .form(form)
            .send()
            .unwrap();
        self.keep(r)
    }

    /// GETs `page`, then posts `form` to `action` with that page's CSRF token.
    fn submit(&mut self, page: &str, action: &str, form: &[(&str, &str)]) -> Page {
        let csrf = self.get(page).csrf();
        let mut fields = vec![("csrf", csrf.as_str())];
        fields.extend_from_slice(form);
        self.post(action, &fields)
    }

    fn session(&self) -> Option<String> {
        self.cookies.get("fhir-edge-session").cloned()
    }

    /// Accepts an invite with [`PASSWORD`] (which signs in).
    fn accept(&mut self, link: &str) -> Page {
        let p = self.submit(link, link, &[("password", PASSWORD), ("confirm", PASSWORD)]);
        assert_eq!(p.status, 303, "{}", p.body);
        p
    }

    fn sign_in(&mut self, email: &str, password: &str) -> Page {
        self.submit(
            "/portal/login",
            "/portal/login",
            &[("email", email), ("password", password)],
        )
    }

    /// Creates a client for `tenants`; returns (client id, secret).
    fn create_client(&mut self, name: &str, tenants: &[&str]) -> (String, String) {
        let csrf = self.get("/portal/clients/new").csrf();
        let mut form = vec![
            ("csrf", csrf.as_str()),
            ("name", name),
            ("description", "first"),
            ("expires_days", "90"),
        ];
        for t in tenants {
            form.push(("tenant", t));
        }
        let p = self.post("/portal/clients/new", &form);
        assert_eq!(p.status, 201, "{}", p.body);
        (p.by_id("client-id"), p.by_id("client-secret"))
    }
}

fn owner(env: &Env, email: &str, tenants: &[&str]) -> Browser {
    let link = invite(&env.proxy, &[], email, tenants);
    let mut b = Browser::new(format!("http://{}", env.proxy.authority()));
    b.accept(&link);
    b
}

#[test]
fn an_owner_invited_by_the_operator_creates_a_client_whose_secret_gets_tokens() {
    let env = start("");
    let mut b = owner(&env, "owner@a.example", &[TENANT_A]);
    assert_eq!(b.get("/portal/clients").status, 200);
    let (id, secret) = b.create_client("teams-patients", &[TENANT_A]);
    let token = env.proxy_token(&id, &secret, TENANT_A);
    assert_eq!(env.fhir_status("/Patient", &token), 200);
    // The client may ask for its owner's tenant only.
    let other = env.token_request(
        &format!("grant_type=client_credentials&scope={TENANT_B}"),
        Some(&format!("{id}:{secret}")),
    );
    assert_eq!(other.status(), 400);
    // The page lists the secret with its description and, after that use, when it was last used.
    let page = b.get(&format!("/portal/clients/{id}"));
    assert!(page.body.contains("first"), "{}", page.body);
    assert!(
        !page.body.contains("<td>never</td>"),
        "no last use shown: {}",
        page.body
    );
    let line = env
        .proxy
        .access_log_at_least(1)
        .into_iter()
        .find(|l| l["portal_action"] == "client_created")
        .expect("an audit line for the new client");
    assert_eq!(line["client_id"], id.as_str());
    assert!(line["account"].as_str().unwrap().starts_with("acct-"));
    assert!(!serde_json::to_string(&line).unwrap().contains(&secret));
    assert!(
        !env.proxy.every_sink().contains(&secret),
        "a secret reached a log"
    );
}

fn basic(id: &str, secret: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
}

impl Env {
    fn proxy_token(&self, id: &str, secret: &str, tenant: &str) -> String {
        let r = self.token_request(
            &format!("grant_type=client_credentials&scope={tenant}"),
            Some(&format!("{id}:{secret}")),
        );
        assert_eq!(r.status(), 200);
        r.json::<serde_json::Value>().unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

#[test]
fn forms_without_the_csrf_token_or_with_a_wrong_one_are_refused() {
    let env = start("");
    let mut b = owner(&env, "owner@a.example", &[TENANT_A]);
    let form = [("name", "x"), ("tenant", TENANT_A), ("expires_days", "90")];
    assert_eq!(b.post("/portal/clients/new", &form).status, 403);
    let mut wrong = vec![("csrf", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")];
    wrong.extend_from_slice(&form);
    assert_eq!(b.post("/portal/clients/new", &wrong).status, 403);
    assert_eq!(b.post("/portal/logout", &[]).status, 403);
    // Before signing in: the double-submitted cookie must match the form.
    let mut anon = Browser::new(b.origin.clone());
    anon.get("/portal/login");
    let p = anon.post(
        "/portal/login",
        &[
            ("csrf", "nope"),
            ("email", "owner@a.example"),
            ("password", PASSWORD),
        ],
    );
    assert_eq!(p.status, 403);
    // A browser's cross-site POST is refused whatever it carries.
    let csrf = b.get("/portal/clients/new").csrf();
    let r = b
        .http
        .post(format!("{}/portal/logout", b.origin))
        .header("cookie", b.cookie_header())
        .header("sec-fetch-site", "cross-site")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    // None of it created a client.
    assert!(b.get("/portal/clients").body.contains("No clients yet."));
}

#[test]
fn a_session_id_from_before_sign_in_is_never_signed_in() {
    let env = start("");
    let link = invite(&env.proxy, &[], "owner@a.example", &[TENANT_A]);
    let mut b = Browser::new(format!("http://{}", env.proxy.authority()));
    b.cookies
        .insert("fhir-edge-session".into(), "planted-by-an-attacker".into());
    b.accept(&link);
    let after = b.session().unwrap();
    assert_ne!(after, "planted-by-an-attacker");
    let mut attacker = Browser::new(b.origin.clone());
    attacker
        .cookies
        .insert("fhir-edge-session".into(), "planted-by-an-attacker".into());
    let p = attacker.get("/portal/clients");
    assert_eq!(p.status, 303);
    assert_eq!(p.location.as_deref(), Some("/portal/login"));
    // Signing in again issues yet another id and ends the one it replaces.
    let csrf = b.get("/portal/clients").csrf();
    assert_eq!(b.post("/portal/logout", &[("csrf", &csrf)]).status, 303);
    let mut old = Browser::new(b.origin.clone());
    old.cookies
        .insert("fhir-edge-session".into(), after.clone());
    assert_eq!(
        old.get("/portal/clients").status,
        303,
        "signed out, yet the old cookie works"
    );
    assert_eq!(b.sign_in("owner@a.example", PASSWORD).status, 303);
    assert_ne!(b.session().unwrap(), after);
    // The cookie's attributes.
    let p = b.sign_in("owner@a.example", PASSWORD);
    let set = p
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("fhir-edge-session="))
        .unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/portal"] {
        assert!(set.contains(attr), "{set}");
    }
}

#[test]
fn an_owner_never_sees_or_changes_another_tenants_clients() {
    let env = start("");
    let mut a = owner(&env, "a@a.example", &[TENANT_A]);
    let mut b = owner(&env, "b@b.example", &[TENANT_B]);
    let (b_client, b_secret) = b.create_client("b-app", &[TENANT_B]);
    // An operator's client allowed every tenant is nobody's in the portal.
    let all = env
        .proxy
        .clients_cli(&["add", "--name", "ops", "--all-tenants"]);
    let ops_id = all["client_id"].as_str().unwrap().to_string();
    let list = a.get("/portal/clients").body;
    assert!(!list.contains(&b_client) && !list.contains(&ops_id));
    let csrf = a.get("/portal/clients").csrf();
    for target in [&b_client, &ops_id] {
        assert_eq!(a.get(&format!("/portal/clients/{target}")).status, 404);
        for (action, extra) in [
            ("secrets", vec![("expires_days", "90")]),
            ("delete", vec![("confirm", "yes")]),
        ] {
            let mut form = vec![("csrf", csrf.as_str())];
            form.extend(extra);
            let p = a.post(&format!("/portal/clients/{target}/{action}"), &form);
            assert_eq!(p.status, 404, "{action} on {target}");
        }
    }
    let b_page = b.get(&format!("/portal/clients/{b_client}"));
    let secret_id = b_page.first_secret_id();
    let revoke = format!("/portal/clients/{b_client}/secrets/{secret_id}/revoke");
    assert_eq!(a.get(&revoke).status, 404);
    assert_eq!(a.post(&revoke, &[("csrf", &csrf)]).status, 404);
    assert_eq!(
        b.get(&revoke).status,
        200,
        "the owner's own confirmation page"
    );
    // Nor can A create a client for B's tenant by editing the form.
    let p = a.post(
        "/portal/clients/new",
        &[
            ("csrf", &csrf),
            ("name", "sneaky"),
            ("tenant", TENANT_B),
            ("expires_days", "90"),
        ],
    );
    assert_eq!(p.status, 404);
    // B's client is untouched and still works.
    let token = env.proxy_token(&b_client, &b_secret, TENANT_B);
    assert_eq!(env.fhir_status("/Patient", &token), 200);
    assert!(!a.get("/portal/clients").body.contains("sneaky"));
}

#[test]
fn repeated_failed_sign_ins_are_throttled_the_same_for_unknown_accounts() {
    let env = start("");
    let b = owner(&env, "owner@a.example", &[TENANT_A]);
    let origin = b.origin.clone();
    for email in ["owner@a.example", "nobody@a.example"] {
        let mut x = Browser::new(origin.clone());
        let mut statuses = Vec::new();
        for _ in 0..3 {
            statuses.push(x.sign_in(email, "wrong password, long enough").status);
        }
        assert_eq!(statuses, vec![401, 401, 401], "{email}");
        // Locked for a bounded time, even with the right password, and the same for both.
        let p = x.sign_in(email, PASSWORD);
        assert_eq!(p.status, 429, "{email}");
        let wait: u64 = p.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&wait), "{wait}");
        assert!(p.body.contains("Too many failed sign-ins"));
    }
    let lines = env.proxy.access_log_at_least(8);
    assert!(lines
        .iter()
        .any(|l| l["portal_action"] == "sign_in_throttled"));
    assert!(!env.proxy.every_sink().contains("wrong password"));
}

#[test]
fn names_and_descriptions_are_shown_escaped() {
    let env = start("");
    let mut b = owner(&env, "owner@a.example", &[TENANT_A]);
    let (id, _) = b.create_client("<script>alert(1)</script>", &[TENANT_A]);
    let csrf = b.get(&format!("/portal/clients/{id}")).csrf();
    let p = b.post(
        &format!("/portal/clients/{id}/secrets"),
        &[
            ("csrf", &csrf),
            ("description", "<img src=x onerror=alert(2)>"),
            ("expires_days", "30"),
        ],
    );
    assert_eq!(p.status, 201);
    for page in [
        b.get("/portal/clients"),
        b.get(&format!("/portal/clients/{id}")),
    ] {
        assert!(!page.body.contains("<script>") && !page.body.contains("<img"));
        assert!(page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    }
    let page = b.get(&format!("/portal/clients/{id}"));
    assert!(page.body.contains("&lt;img src=x onerror=alert(2)&gt;"));
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && !csp.contains("unsafe-inline"));
    assert_eq!(page.headers["x-frame-options"], "DENY");
    assert_eq!(page.headers["referrer-policy"], "no-referrer");
    assert_eq!(p.headers["cache-control"], "no-store");
}

#[test]
fn revoking_a_secret_in_the_portal_ends_its_tokens_and_the_last_secret_stays() {
    let env = start("");
    let mut b = owner(&env, "owner@a.example", &[TENANT_A]);
    let (id, first) = b.create_client("app", &[TENANT_A]);
    let old_token = env.proxy_token(&id, &first, TENANT_A);
    let page = b.get(&format!("/portal/clients/{id}"));
    let first_id = page.first_secret_id();
    // The only secret cannot be revoked.
    let p = b.post(
        &format!("/portal/clients/{id}/secrets/{first_id}/revoke"),
        &[("csrf", &page.csrf())],
    );
    assert_eq!(p.status, 409);
    let p = b.post(
        &format!("/portal/clients/{id}/secrets"),
        &[
            ("csrf", &page.csrf()),
            ("description", "second"),
            ("expires_days", "365"),
        ],
    );
    let second = p.by_id("client-secret");
    let p = b.post(
        &format!("/portal/clients/{id}/secrets/{first_id}/revoke"),
        &[("csrf", &page.csrf())],
    );
    assert_eq!(p.status, 303);
    let r = env.token_request(
        &format!("grant_type=client_credentials&scope={TENANT_A}"),
        Some(&format!("{id}:{first}")),
    );
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<serde_json::Value>().unwrap()["error"],
        "invalid_client"
    );
    assert_eq!(env.fhir_status("/Patient", &old_token), 401);
    let token = env.proxy_token(&id, &second, TENANT_A);
    assert_eq!(env.fhir_status("/Patient", &token), 200);
    // Deleting the client ends that too.
    let p = b.post(
        &format!("/portal/clients/{id}/delete"),
        &[("csrf", &page.csrf()), ("confirm", "yes")],
    );
    assert_eq!(p.status, 303);
    assert_eq!(env.fhir_status("/Patient", &token), 401);
    let activity = b.get("/portal/activity").body;
    for what in [
        "Client created",
        "Secret added",
        "Secret revoked",
        "Client deleted",
    ] {
        assert!(
            activity.contains(what),
            "{what} missing from the activity page"
        );
    }
}

#[test]
fn invites_are_single_use_and_password_changes_and_disabling_end_sessions() {
    let env = start("");
    let link = invite(&env.proxy, &[], "owner@a.example", &[TENANT_A]);
    let mut b = Browser::new(format!("http://{}", env.proxy.authority()));
    // A password with the e-mail address or the product's name is refused.
    let p = b.submit(
        &link,
        &link,
        &[
            ("password", "fhir-edge-password-1"),
            ("confirm", "fhir-edge-password-1"),
        ],
    );
    assert_eq!(p.status, 400);
    b.accept(&link);
    let mut again = Browser::new(b.origin.clone());
    assert_eq!(again.get(&link).status, 404, "an invite link worked twice");
    // Two sessions; a password change ends both.
    let mut other = Browser::new(b.origin.clone());
    assert_eq!(other.sign_in("owner@a.example", PASSWORD).status, 303);
    let new_password = "another quite long passphrase";
    let p = b.submit(
        "/portal/account/password",
        "/portal/account/password",
        &[
            ("current", PASSWORD),
            ("password", new_password),
            ("confirm", new_password),
        ],
    );
    assert_eq!(p.status, 303);
    assert_eq!(other.get("/portal/clients").status, 303);
    assert_eq!(b.get("/portal/clients").status, 303);
    assert_eq!(b.sign_in("owner@a.example", PASSWORD).status, 401);
    assert_eq!(b.sign_in("owner@a.example", new_password).status, 303);
    // The operator disables the account: signed out, and signing in fails.
    let out = portal_cli(&env.proxy, &[], &["disable", "--email", "owner@a.example"]);
    assert!(out.status.success());
    assert_eq!(b.get("/portal/clients").status, 303);
    assert_eq!(b.sign_in("owner@a.example", new_password).status, 401);
    // A reset sends a new link; the old password no longer works.
    portal_cli(&env.proxy, &[], &["enable", "--email", "owner@a.example"]);
    let out = portal_cli(
        &env.proxy,
        &[],
        &["--json", "reset", "--email", "owner@a.example"],
    );
    assert!(out.status.success());
    assert_eq!(b.sign_in("owner@a.example", new_password).status, 401);
    let out = portal_cli(&env.proxy, &[], &["--json", "accounts"]);
    let accounts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(accounts[0]["email"], "owner@a.example");
    assert_eq!(accounts[0]["password_set"], false);
    let state = std::fs::read_to_string(env.proxy.dir.path().join("portal-state.json")).unwrap();
    assert!(!state.contains(PASSWORD) && !state.contains(new_password));
}

#[test]
fn the_portal_can_have_a_listener_of_its_own() {
    let port = crate::support::proxy::free_port();
    // A public URL whose path is not where the pages are would print dead invitation links.
    let meta = StubUpstream::start("meta");
    let mut cfg = ProxyConfig::new(meta.url("/fhir"), "tenants: {}\n".into());
    cfg.token = Some(default_token_section());
    cfg.top = portal_section(&format!("  public_url: \"http://127.0.0.1:{port}\"\n"));
    let err = Proxy::try_start(cfg)
        .err()
        .expect("a public_url without the portal's path");
    assert!(
        err.contains("portal.public_url") && err.contains("/portal"),
        "{err}"
    );
    let env = start(&format!(
        "  listen: [\"127.0.0.1:{port}\"]\n  public_url: \"http://127.0.0.1:{port}/portal\"\n"
    ));
    // The invitation link names the portal's own listener, and works there.
    let out = portal_cli(
        &env.proxy,
        &[],
        &[
            "--json",
            "invite",
            "--email",
            "owner@a.example",
            "--tenant",
            TENANT_A,
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let link = v["link"].as_str().unwrap();
    assert!(
        link.starts_with(&format!("http://127.0.0.1:{port}/portal/invite/")),
        "{link}"
    );
    assert_eq!(client().get(link).send().unwrap().status(), 200);
    let http = client();
    let own = http
        .get(format!("http://127.0.0.1:{port}/portal/login"))
        .send()
        .unwrap();
    assert_eq!(own.status(), 200);
    let fhir = http
        .get(format!("http://127.0.0.1:{port}/metadata"))
        .send()
        .unwrap();
    assert_eq!(fhir.status(), 404, "the portal's listener serves FHIR");
    let main = http.get(env.proxy.url("/portal/login")).send().unwrap();
    assert_ne!(
        main.status(),
        200,
        "the portal is on the public listener too"
    );
}

#[test]
fn the_portal_over_postgresql_shares_sessions_and_clients_across_replicas() {
    let pg = Postgres::start();
    let meta = StubUpstream::start("meta");
    meta.set_response(
        &[("Content-Type", "application/fhir+json")],
        crate::support::capability_statement(&meta.url("/fhir")),
    );
    let a = StubUpstream::start("tenant-a");
    let env = vec![("TEST_DATABASE_URL".to_string(), pg.url("postgres"))];
    let replica = || {
        let routes =
            crate::support::proxy::routes_yaml(&[(TENANT_A, "tenant-a", &a.url("/r4"), "")]);
        let mut cfg = ProxyConfig::new(meta.url("/fhir"), routes);
        cfg.token = Some(format!(
            "  signing_key: {}\n  issuer: \"https://edge.fleet.test\"\n  audience: \"https://edge.fleet.test/\"\n  clients: {{ store: postgres }}\n",
            fixture("keys/signing-es256.pem").display()
        ));
        cfg.top = format!(
            "database:\n  url_env: TEST_DATABASE_URL\n{}",
            portal_section("")
        );
        cfg.env = env.clone();
        Proxy::start(cfg)
    };
    migrate(&env);
    let one = replica();
    let two = replica();
    let link = invite(&one, &env, "owner@a.example", &[TENANT_A]);
    let mut b = Browser::new(format!("http://{}", one.authority()));
    b.accept(&link);
    // The same session cookie works on the other replica.
    let mut on_two = Browser::new(format!("http://{}", two.authority()));
    on_two.cookies = b.cookies.clone();
    assert_eq!(on_two.get("/portal/clients").status, 200);
    let (id, secret) = on_two.create_client("fleet-app", &[TENANT_A]);
    // Replica one issues tokens for it.
    let r = client()
        .post(one.url("/token"))
        .header("authorization", format!("Basic {}", basic(&id, &secret)))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("grant_type=client_credentials&scope={TENANT_A}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    // Failed sign-ins count once for the fleet: three on one replica lock the address on two.
    let mut x1 = Browser::new(format!("http://{}", one.authority()));
    for _ in 0..3 {
        assert_eq!(
            x1.sign_in("owner@a.example", "not the password at all")
                .status,
            401
        );
    }
    let mut x2 = Browser::new(format!("http://{}", two.authority()));
    assert_eq!(x2.sign_in("owner@a.example", PASSWORD).status, 429);
    // Signing out on one ends the session on two.
    let csrf = b.get("/portal/clients").csrf();
    assert_eq!(b.post("/portal/logout", &[("csrf", &csrf)]).status, 303);
    assert_eq!(on_two.get("/portal/clients").status, 303);
    let stored = pg.psql("SELECT password_hash FROM fhir_edge_portal_accounts");
    assert!(stored.contains("$argon2id$") && !stored.contains(PASSWORD));
    // The last use reaches the database within the flush interval.
    assert!(crate::support::eventually(Duration::from_secs(40), || {
        pg.psql("SELECT count(*) FROM fhir_edge_secret_usage") == "1"
    }));
}

/// Migrates the database as an operator would, with a config naming only the database.
fn migrate(env: &[(String, String)]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.yaml");
    std::fs::write(&path, "database:\n  url_env: TEST_DATABASE_URL\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fhir-edge"))
        .args(["db", "migrate", "--config"])
        .arg(&path)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sessions_end_after_their_idle_and_absolute_timeouts() {
    let env = start("  session_idle_minutes: 30\n  session_hours: 12\n");
    let state = env.proxy.dir.path().join("portal-state.json");
    // The file store is read on every request, so ageing its sessions ages them for the proxy.
    let age = |field: &str, seconds: u64| {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
        for s in v["sessions"].as_array_mut().unwrap() {
            let t = s[field].as_u64().unwrap();
            s[field] = (t - seconds).into();
        }
        std::fs::write(&state, serde_json::to_vec(&v).unwrap()).unwrap();
    };
    let mut b = owner(&env, "owner@a.example", &[TENANT_A]);
    age("last_seen", 29 * 60);
    assert_eq!(
        b.get("/portal/clients").status,
        200,
        "ended before the idle timeout"
    );
    age("last_seen", 31 * 60);
    assert_eq!(
        b.get("/portal/clients").status,
        303,
        "idle for 31 minutes, still signed in"
    );
    assert_eq!(b.sign_in("owner@a.example", PASSWORD).status, 303);
    // Busy all along (just seen) but signed in 12 hours ago: ended.
    age("created", 12 * 3600);
    assert_eq!(
        b.get("/portal/clients").status,
        303,
        "past the absolute timeout"
    );
}

#[test]
fn a_portal_path_that_would_hide_fhir_or_the_token_endpoint_is_refused() {
    let meta = StubUpstream::start("meta");
    for path in [
        "/Patient",
        "/token",
        "/register/x",
        "/metadata",
        "/portal/../x",
    ] {
        let mut cfg = ProxyConfig::new(meta.url("/fhir"), "tenants: {}\n".into());
        cfg.token = Some(default_token_section());
        cfg.top = format!("portal:\n  path: {path}\n");
        let err = Proxy::try_start(cfg)
            .err()
            .unwrap_or_else(|| panic!("{path} accepted"));
        assert!(err.contains("portal.path"), "{path}: {err}");
    }
    // Without a token endpoint there is nothing to manage.
    let mut cfg = ProxyConfig::new(meta.url("/fhir"), "tenants: {}\n".into());
    cfg.top = "portal:\n  path: /portal\n".into();
    let err = Proxy::try_start(cfg)
        .err()
        .expect("a portal without a token endpoint");
    assert!(err.contains("needs token_endpoint"), "{err}");
}

/// The current RFC 6238 code of a base32 key (SHA-1, 6 digits, 30 s), and its time step.
fn totp_now(key: &str) -> (String, u64) {
    let totp = totp_rs::Builder::new()
        .with_secret(totp_rs::Secret::try_from_base32(key).unwrap())
        .build()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (totp.generate(now).to_string(), now / 30)
}

#[test]
fn required_two_step_sign_in_is_set_up_first_and_each_code_works_once() {
    let env = start("  require_totp: true\n");
    let mut b = owner(&env, "owner@a.example", &[TENANT_A]);
    // Until TOTP is on, every page leads to its set-up.
    let p = b.get("/portal/clients");
    assert_eq!(
        (p.status, p.location.as_deref()),
        (303, Some("/portal/account/totp"))
    );
    let setup = b.get("/portal/account/totp");
    let key = setup.by_id("totp-key");
    assert_eq!(key.len(), 32);
    // A reload shows the key already scanned.
    assert_eq!(b.get("/portal/account/totp").by_id("totp-key"), key);
    let wrong = b.post(
        "/portal/account/totp",
        &[
            ("csrf", &setup.csrf()),
            ("secret", &key),
            ("code", "000000"),
        ],
    );
    assert_eq!(wrong.status, 400);
    let (code, step) = totp_now(&key);
    let done = b.post(
        "/portal/account/totp",
        &[("csrf", &setup.csrf()), ("secret", &key), ("code", &code)],
    );
    assert_eq!(done.status, 200, "{}", done.body);
    let recovery: Vec<String> = done
        .body
        .split("<li><code>")
        .skip(1)
        .map(|c| c.split('<').next().unwrap().to_string())
        .collect();
    assert_eq!(recovery.len(), 10);
    assert_eq!(b.get("/portal/clients").status, 200);
    let mut other = Browser::new(b.origin.clone());
    let sign_in = |x: &mut Browser, code: &str| {
        x.submit(
            "/portal/login",
            "/portal/login",
            &[
                ("email", "owner@a.example"),
                ("password", PASSWORD),
                ("code", code),
            ],
        )
        .status
    };
    // The password alone is not enough, nor is the code already used to turn TOTP on.
    assert_eq!(sign_in(&mut other, ""), 401);
    let (again, same_step) = totp_now(&key);
    if same_step == step {
        assert_eq!(
            sign_in(&mut other, &again),
            401,
            "a TOTP code was accepted twice"
        );
    }
    // A recovery code works once.
    assert_eq!(sign_in(&mut other, &recovery[0]), 303);
    assert_eq!(
        sign_in(&mut Browser::new(b.origin.clone()), &recovery[0]),
        401
    );
    let state = std::fs::read_to_string(env.proxy.dir.path().join("portal-state.json")).unwrap();
    assert!(
        !state.contains(&recovery[1]),
        "a recovery code is stored as is"
    );
}

#[test]
fn a_successful_sign_in_clears_the_failures_before_it() {
    let env = start("");
    let b = owner(&env, "owner@a.example", &[TENANT_A]);
    let mut x = Browser::new(b.origin.clone());
    for _ in 0..2 {
        assert_eq!(
            x.sign_in("owner@a.example", "a typo in the password")
                .status,
            401
        );
    }
    assert_eq!(x.sign_in("owner@a.example", PASSWORD).status, 303);
    for _ in 0..2 {
        assert_eq!(
            x.sign_in("owner@a.example", "a typo in the password")
                .status,
            401
        );
    }
    assert_eq!(
        x.sign_in("owner@a.example", PASSWORD).status,
        303,
        "locked out by earlier typos"
    );
    // The count is in the state file, by the address's hash: never the address or a password.
    let state = std::fs::read_to_string(env.proxy.dir.path().join("portal-state.json")).unwrap();
    assert!(!state.contains("a typo"));
}

#[test]
fn over_tls_the_cookies_are_secure_and_named_so() {
    let env = Env::start_with(|cfg| {
        cfg.token = Some(default_token_section());
        cfg.top = portal_section("");
        cfg.tls = true;
    });
    let port = env.proxy.tls_port.unwrap();
    let pem = std::fs::read(fixture("tls/ca.pem")).unwrap();
    let https = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = https
        .get(format!("https://localhost:{port}/portal/login"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let set = r.headers()["set-cookie"].to_str().unwrap();
    assert!(
        set.starts_with("__Secure-fhir-edge-csrf=") && set.contains("; Secure"),
        "{set}"
    );
    // The same portal over plain HTTP: no `Secure`, no prefix (a browser would drop such a cookie).
    let plain = client().get(env.proxy.url("/portal/login")).send().unwrap();
    let set = plain.headers()["set-cookie"].to_str().unwrap();
    assert!(
        set.starts_with("fhir-edge-csrf=") && !set.contains("Secure"),
        "{set}"
    );
}
