//! The portal's pages and actions: which path does what, for whom.

use http::Method;

use super::account::{self, check_totp, normalise_recovery_code, password_problem, sha256_hex};
use super::pages::{self, ClientView, Flash, SecretView};
use super::store::{AccountChange, Activity, SessionRow};
use super::{Form, PageError, Portal, Reply, Request, Signed};
use crate::tenant::TenantId;
use crate::time::now_unix;
use crate::token::clients::change::{new_client, new_client_secret};
use crate::token::clients::{Allowed, Client};
use crate::token::clients::{Change, StoreError};

/// Secret lifetimes an owner may choose, in days (Entra ID offers up to two years).
pub(super) const EXPIRY_DAYS: &[u64] = &[30, 90, 180, 365, 730];
const DEFAULT_EXPIRY_DAYS: u64 = 180;

type Page = Result<Reply, PageError>;

impl Portal {
    pub(super) async fn dispatch(&self, req: &Request) -> Page {
        let now = now_unix();
        let segments: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
        let get = req.method == Method::GET || req.method == Method::HEAD;
        let post = req.method == Method::POST;
        match (segments.as_slice(), get, post) {
            (["static", "portal.css"], true, _) => Ok(stylesheet()),
            (["login"], true, _) => self.login_page(req, None, 200, ""),
            (["login"], _, true) => self.login(req, now).await,
            (["invite", token], true, _) => self.invite_page(req, token, now).await,
            (["invite", token], _, true) => self.accept_invite(req, token, now).await,
            (["login" | "invite", ..], ..) => Err(PageError::MethodNotAllowed("GET, POST")),
            (["static", ..], ..) => Err(PageError::NotFound),
            _ => {
                let Some(s) = self.signed_in(req, now).await? else {
                    return Ok(self.redirect("{portal}/{other}", "/login"));
                };
                self.signed_dispatch(req, &segments, get, post, s, now)
                    .await
            }
        }
    }

    async fn signed_dispatch(
        &self,
        req: &Request,
        segments: &[&str],
        get: bool,
        post: bool,
        s: Signed,
        now: u64,
    ) -> Page {
        let totp_missing = self.cfg.require_totp && s.account.totp_secret.is_none();
        match (segments, get, post) {
            (["logout"], _, true) => self.logout(req, &s, now).await,
            (["account", "totp"], true, _) => self.totp_page(&s, None),
            (["account", "totp"], _, true) => self.enable_totp(req, &s, now).await,
            _ if totp_missing => Ok(self.redirect("{portal}/{other}", "/account/totp")),
            ([], true, _) => Ok(self.redirect("{portal}/", "/clients")),
            (["clients"], true, _) => Ok(self.clients_page(&s, None, 200)),
            (["clients", "new"], true, _) => Ok(self.new_client_page(&s, None, 200)),
            (["clients", "new"], _, true) => self.create_client(req, &s, now).await,
            (["clients", id], true, _) => self.client_page(&s, id, None, 200).await,
            (["clients", id, "secrets"], _, true) => self.add_secret(req, &s, id, now).await,
            (["clients", id, "secrets", sid, "revoke"], true, _) => {
                self.revoke_page(&s, id, sid).await
            }
            (["clients", id, "secrets", sid, "revoke"], _, true) => {
                self.revoke_secret(req, &s, id, sid, now).await
            }
            (["clients", id, "delete"], _, true) => self.delete_client(req, &s, id, now).await,
            (["activity"], true, _) => self.activity_page(&s).await,
            (["account"], true, _) => Ok(self.account_page(&s, None)),
            (["account", "password"], true, _) => Ok(self.password_page(&s, None, 200)),
            (["account", "password"], _, true) => self.change_password(req, &s, now).await,
            (["logout"] | ["clients", ..] | ["account", ..], ..) => {
                Err(PageError::MethodNotAllowed(if post {
                    "GET"
                } else {
                    "POST"
                }))
            }
            _ => Err(PageError::NotFound),
        }
    }

    /// Records an action in the account's activity, and marks `reply` with it for the audit log
    /// and the metric, so the two always name the same action.
    #[allow(clippy::too_many_arguments)]
    async fn acted(
        &self,
        req: &Request,
        mut reply: Reply,
        account_id: &str,
        action: &'static str,
        client_id: Option<&str>,
        secret_id: Option<&str>,
        now: u64,
    ) -> Page {
        self.store
            .record(Activity {
                at: now,
                account_id: account_id.to_string(),
                source: req.source.map(|s| s.to_string()),
                action: action.into(),
                client_id: client_id.map(str::to_string),
                secret_id: secret_id.map(str::to_string),
            })
            .await?;
        reply.action = Some(action);
        reply.account = Some(account_id.to_string());
        reply.client_id = client_id.map(str::to_string);
        Ok(reply)
    }

    // ---- signing in ----

    fn login_page(&self, req: &Request, flash: Option<Flash>, status: u16, email: &str) -> Page {
        let token = self.cookie(req, "csrf").map_or_else(new_token, Ok)?;
        let flash = flash.or_else(|| match req.query.as_deref() {
            Some("changed") => Some(Flash::Ok("Password changed. Sign in again.".into())),
            Some("out") => Some(Flash::Ok("Signed out.".into())),
            _ => None,
        });
        let mut r = self.html(
            status,
            "{portal}/login",
            pages::login(self, &token, email, flash.as_ref()),
        );
        r.headers.push(self.set_cookie(req, "csrf", Some(&token)));
        Ok(r)
    }

    async fn login(&self, req: &Request, now: u64) -> Page {
        let form = Form::parse(req)?;
        self.check_anonymous_csrf(req, &form)?;
        let email = form.get("email").unwrap_or_default().trim().to_lowercase();
        let password = form.get("password").unwrap_or_default().to_string();
        // Failures count per address given, in the store (one count for the fleet, the same
        // whether or not an account has the address), and per source, in this replica's sketch.
        let key = sha256_hex(&email);
        let t = &self.cfg.throttle;
        let (failures, since) = self
            .store
            .login_failures(&key, now, t.window_seconds)
            .await?;
        let by_account = (failures >= t.per_client)
            .then(|| since.saturating_add(t.window_seconds).saturating_sub(now));
        if let Some(wait) = by_account
            .max(self.limiter.retry_after(None, req.source))
            .map(|w| w.max(1))
        {
            let minutes = wait.div_ceil(60);
            let mut r = self.login_page(
                req,
                Some(Flash::Error(format!(
                    "Too many failed sign-ins. Try again in {minutes} minute{}.",
                    if minutes == 1 { "" } else { "s" }
                ))),
                429,
                &email,
            )?;
            r.headers.push(("retry-after", wait.to_string()));
            r.action = Some("sign_in_throttled");
            return Ok(r);
        }
        let account = if email.len() <= 254 && password.len() <= account::MAX_PASSWORD {
            self.store.account_by_email(&email).await?
        } else {
            None
        };
        let usable = account.as_ref().filter(|a| !a.disabled);
        let stored = usable.and_then(|a| a.password_hash.clone());
        let mut ok = account::verify_password(password, stored).await;
        if let (true, Some(a)) = (ok, usable) {
            if let Some(secret) = &a.totp_secret {
                ok = self.second_factor(a, secret, form.get("code"), now).await?;
            }
        }
        let Some(a) = usable.filter(|_| ok) else {
            self.limiter.record_failure(None, req.source);
            self.store
                .note_login_failure(&key, now, t.window_seconds)
                .await?;
            if let Some(a) = &account {
                // Recorded off the answer's path: a reply that waited for this write would take
                // longer for an address that has an account than for one that has none.
                let (store, activity) = (
                    self.store.clone(),
                    Activity {
                        at: now,
                        account_id: a.id.clone(),
                        source: req.source.map(|s| s.to_string()),
                        action: "sign_in_failed".into(),
                        client_id: None,
                        secret_id: None,
                    },
                );
                tokio::spawn(async move {
                    if let Err(e) = store.record(activity).await {
                        log::warn!("portal: cannot record a failed sign-in: {e}");
                    }
                });
            }
            let mut r = self.login_page(
                req,
                Some(Flash::Error(
                    "The e-mail address, password or code is not right.".into(),
                )),
                401,
                &email,
            )?;
            r.action = Some("sign_in_failed");
            r.account = account.map(|a| a.id);
            return Ok(r);
        };
        if failures > 0 {
            self.store.clear_login_failures(&key).await?;
        }
        // A new session id at every sign-in: a session id planted before cannot be signed in.
        if let Some(old) = self.cookie(req, "session") {
            self.store.end_session(&sha256_hex(&old)).await?;
        }
        let r = self.start_session(req, &a.id, "/clients", now).await?;
        self.acted(req, r, &a.id, "signed_in", None, None, now)
            .await
    }

    /// The second factor: a TOTP code (each time step accepted once) or an unused recovery code.
    async fn second_factor(
        &self,
        a: &super::store::Account,
        secret: &str,
        code: Option<&str>,
        now: u64,
    ) -> Result<bool, PageError> {
        let Some(code) = code else {
            return Ok(false);
        };
        if let Some(step) = check_totp(secret, code, now) {
            return Ok(self.store.use_totp_step(&a.id, step).await?);
        }
        match normalise_recovery_code(code) {
            Some(c) => Ok(self.store.use_recovery_code(&a.id, &sha256_hex(&c)).await?),
            None => Ok(false),
        }
    }

    /// Creates a session for `account_id` and redirects to `to` with its cookie.
    async fn start_session(&self, req: &Request, account_id: &str, to: &str, now: u64) -> Page {
        let id = new_token()?;
        let csrf = new_token()?;
        self.store
            .create_session(SessionRow {
                id_hash: sha256_hex(&id),
                account_id: account_id.to_string(),
                csrf,
                created: now,
                last_seen: now,
            })
            .await?;
        let mut r = self.redirect("{portal}/login", to);
        r.headers.push(self.set_cookie(req, "session", Some(&id)));
        r.headers.push(self.set_cookie(req, "csrf", None));
        Ok(r)
    }

    async fn logout(&self, req: &Request, s: &Signed, now: u64) -> Page {
        let form = Form::parse(req)?;
        Portal::check_csrf(req, &form, s)?;
        // Signing out ends every session of the account, on every device.
        self.store
            .change_account(&s.account.id, AccountChange::EndSessions)
            .await?;
        let mut r = self.redirect("{portal}/logout", "/login?out");
        r.headers.push(self.set_cookie(req, "session", None));
        self.acted(req, r, &s.account.id, "signed_out", None, None, now)
            .await
    }

    // ---- invites and passwords ----

    async fn invite_page(&self, req: &Request, token: &str, now: u64) -> Page {
        let Some(a) = self.store.peek_invite(&sha256_hex(token), now).await? else {
            return Ok(self.invalid_invite());
        };
        let csrf = self.cookie(req, "csrf").map_or_else(new_token, Ok)?;
        let mut r = self.html(
            200,
            "{portal}/invite/{token}",
            pages::invite(self, token, &a.email, &csrf, None),
        );
        r.headers.push(self.set_cookie(req, "csrf", Some(&csrf)));
        Ok(r)
    }

    fn invalid_invite(&self) -> Reply {
        self.html(
            404,
            "{portal}/invite/{token}",
            pages::message(
                self,
                None,
                "Link not valid",
                "This link was used already, has expired or was never issued. Ask your operator for a new one.",
            ),
        )
    }

    async fn accept_invite(&self, req: &Request, token: &str, now: u64) -> Page {
        let form = Form::parse(req)?;
        self.check_anonymous_csrf(req, &form)?;
        let hash = sha256_hex(token);
        let Some(a) = self.store.peek_invite(&hash, now).await? else {
            return Ok(self.invalid_invite());
        };
        let password = form.get("password").unwrap_or_default();
        let problem =
            password_problem(password, &a.email, self.cfg.min_password_length).or_else(|| {
                (form.get("confirm") != Some(password))
                    .then(|| "The two passwords differ.".to_string())
            });
        if let Some(p) = problem {
            let csrf = self.cookie(req, "csrf").unwrap_or_default();
            return Ok(self.html(
                400,
                "{portal}/invite/{token}",
                pages::invite(self, token, &a.email, &csrf, Some(&Flash::Error(p))),
            ));
        }
        let hashed = account::hash_password(password.to_string())
            .await
            .map_err(unavailable)?;
        let Some(a) = self.store.accept_invite(&hash, now, hashed).await? else {
            return Ok(self.invalid_invite());
        };
        let mut r = self.start_session(req, &a.id, "/account/totp", now).await?;
        r.template = "{portal}/invite/{token}";
        self.acted(req, r, &a.id, "password_set", None, None, now)
            .await
    }

    fn password_page(&self, s: &Signed, flash: Option<Flash>, status: u16) -> Reply {
        self.html(
            status,
            "{portal}/account/password",
            pages::password(self, s, flash.as_ref()),
        )
    }

    async fn change_password(&self, req: &Request, s: &Signed, now: u64) -> Page {
        let form = Form::parse(req)?;
        Portal::check_csrf(req, &form, s)?;
        let current = form.get("current").unwrap_or_default().to_string();
        let new = form.get("password").unwrap_or_default();
        if !account::verify_password(current, s.account.password_hash.clone()).await {
            return Ok(self.password_page(
                s,
                Some(Flash::Error("The current password is not right.".into())),
                400,
            ));
        }
        let problem = password_problem(new, &s.account.email, self.cfg.min_password_length)
            .or_else(|| {
                (form.get("confirm") != Some(new)).then(|| "The two passwords differ.".to_string())
            });
        if let Some(p) = problem {
            return Ok(self.password_page(s, Some(Flash::Error(p)), 400));
        }
        let hashed = account::hash_password(new.to_string())
            .await
            .map_err(unavailable)?;
        // Ends every session of the account, this one included.
        self.store
            .change_account(&s.account.id, AccountChange::Password(hashed))
            .await?;
        let mut r = self.redirect("{portal}/account/password", "/login?changed");
        r.headers.push(self.set_cookie(req, "session", None));
        self.acted(req, r, &s.account.id, "password_changed", None, None, now)
            .await
    }

    // ---- TOTP ----

    fn totp_page(&self, s: &Signed, flash: Option<(Flash, String)>) -> Page {
        if s.account.totp_secret.is_some() {
            return Ok(self.html(200, "{portal}/account/totp", pages::totp_enabled(self, s)));
        }
        let (flash, secret, status) = match flash {
            Some((f, secret)) => (Some(f), secret, 400),
            None => (None, account::setup_totp_secret(&s.session.id_hash), 200),
        };
        let uri = account::otpauth_uri(&secret, &s.account.email);
        Ok(self.html(
            status,
            "{portal}/account/totp",
            pages::totp_setup(
                self,
                s,
                &secret,
                &uri,
                flash.as_ref(),
                self.cfg.require_totp,
            ),
        ))
    }

    async fn enable_totp(&self, req: &Request, s: &Signed, now: u64) -> Page {
        let form = Form::parse(req)?;
        Portal::check_csrf(req, &form, s)?;
        if s.account.totp_secret.is_some() {
            return Ok(self.redirect("{portal}/account/totp", "/account/totp"));
        }
        let secret = form.get("secret").unwrap_or_default();
        if account::totp(secret).is_none() || secret.len() != 32 {
            return Err(PageError::BadRequest("The form was changed."));
        }
        let Some(step) = form.get("code").and_then(|c| check_totp(secret, c, now)) else {
            return self.totp_page(
                s,
                Some((
                    Flash::Error("That code is not right. Check the clock of your device and enter the current code.".into()),
                    secret.to_string(),
                )),
            );
        };
        let (shown, stored) = account::new_recovery_codes().map_err(unavailable)?;
        self.store
            .change_account(
                &s.account.id,
                AccountChange::Totp {
                    secret: secret.to_string(),
                    recovery_codes: stored,
                },
            )
            .await?;
        self.store.use_totp_step(&s.account.id, step).await?;
        let r = self.html(
            200,
            "{portal}/account/totp",
            pages::recovery_codes(self, s, &shown),
        );
        self.acted(req, r, &s.account.id, "totp_enabled", None, None, now)
            .await
    }

    fn account_page(&self, s: &Signed, flash: Option<Flash>) -> Reply {
        self.html(
            200,
            "{portal}/account",
            pages::account(self, s, &self.tenant_names(&s.tenants), flash.as_ref()),
        )
    }

    async fn activity_page(&self, s: &Signed) -> Page {
        let entries = self.store.activity(&s.account.id, 200).await?;
        Ok(self.html(200, "{portal}/activity", pages::activity(self, s, &entries)))
    }

    /// Each of the account's tenants with its name in the routing table (`None`: not routed).
    pub(super) fn tenant_names(&self, tenants: &[TenantId]) -> Vec<(String, Option<String>)> {
        let table = self.token.routes.load();
        tenants
            .iter()
            .map(|t| (t.to_string(), table.get(t).map(|r| r.name.to_string())))
            .collect()
    }

    // ---- clients ----

    /// Whether the owner may see and act on `c`: every tenant it may ask tokens for is one of the
    /// account's. A client allowed every tenant belongs to the operator alone.
    fn owns(s: &Signed, c: &Client) -> bool {
        match &c.allowed {
            Allowed::All => false,
            Allowed::Only(set) => !set.is_empty() && set.iter().all(|t| s.tenants.contains(t)),
        }
    }

    fn clients_page(&self, s: &Signed, flash: Option<Flash>, status: u16) -> Reply {
        let registry = self.token.clients.load();
        let mut clients: Vec<ClientView> = registry
            .iter()
            .filter(|c| Portal::owns(s, c))
            .map(|c| ClientView::of(c, now_unix()))
            .collect();
        clients.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        self.html(
            status,
            "{portal}/clients",
            pages::clients(
                self,
                s,
                &self.tenant_names(&s.tenants),
                &clients,
                flash.as_ref(),
            ),
        )
    }

    fn new_client_page(&self, s: &Signed, flash: Option<Flash>, status: u16) -> Reply {
        self.html(
            status,
            "{portal}/clients/new",
            pages::new_client(self, s, &self.tenant_names(&s.tenants), flash.as_ref()),
        )
    }

    /// A secret's description and expiry from a form.
    fn secret_fields(form: &Form, now: u64) -> Result<(Option<String>, u64), String> {
        let description = form
            .get("description")
            .map(str::trim)
            .filter(|d| !d.is_empty());
        if let Some(d) = description {
            if d.chars().count() > crate::token::clients::file::MAX_DESCRIPTION
                || d.chars().any(char::is_control)
            {
                return Err(format!(
                    "Keep the description to {} characters on one line.",
                    crate::token::clients::file::MAX_DESCRIPTION
                ));
            }
        }
        let days = form
            .get("expires_days")
            .and_then(|d| d.parse::<u64>().ok())
            .unwrap_or(DEFAULT_EXPIRY_DAYS);
        if !EXPIRY_DAYS.contains(&days) {
            return Err("Choose one of the offered expiry times.".into());
        }
        Ok((description.map(str::to_string), now + days * 86_400))
    }

    async fn create_client(&self, req: &Request, s: &Signed, now: u64) -> Page {
        let form = Form::parse(req)?;
        Portal::check_csrf(req, &form, s)?;
        let name = form.get("name").unwrap_or_default().trim().to_string();
        let mut tenants = Vec::new();
        for t in form.all("tenant") {
            // Only the account's own tenants: anything else is refused, never dropped silently.
            match TenantId::parse(t).filter(|t| s.tenants.contains(t)) {
                Some(t) if !tenants.contains(&t) => tenants.push(t),
                Some(_) => {}
                None => return Err(PageError::NotFound),
            }
        }
        let problem = if name.is_empty()
            || name.chars().count() > 128
            || name.chars().any(char::is_control)
        {
            Some("Give the client a name of 1 to 128 characters.".to_string())
        } else if tenants.is_empty() {
            Some("Choose at least one tenant.".to_string())
        } else {
            None
        };
        let fields = Portal::secret_fields(&form, now);
        let (description, expires) = match (problem, fields) {
            (Some(p), _) | (None, Err(p)) => {
                return Ok(self.new_client_page(s, Some(Flash::Error(p)), 400));
            }
            (None, Ok(f)) => f,
        };
        let tenant_texts = tenants.iter().map(ToString::to_string).collect();
        let (mut change, issued) = new_client(&name, tenant_texts, now).map_err(unavailable)?;
        if let Change::AddClient { entry, .. } = &mut change {
            for secret in &mut entry.secrets {
                secret.description = description.clone();
                secret.expires = Some(crate::time::format_rfc3339(expires));
            }
        }
        self.token
            .clients
            .apply(change)
            .await
            .map_err(store_error)?;
        let r = self.html(
            201,
            "{portal}/clients/new",
            pages::secret_shown(
                self,
                s,
                &issued.client_id,
                &name,
                &issued.secret_id,
                &issued.secret,
                expires,
                true,
            ),
        );
        self.acted(
            req,
            r,
            &s.account.id,
            "client_created",
            Some(&issued.client_id),
            Some(&issued.secret_id),
            now,
        )
        .await
    }

    /// The client `id` if the owner may see it.
    fn owned_client(&self, s: &Signed, id: &str) -> Result<ClientView, PageError> {
        let registry = self.token.clients.load();
        match registry.get(id) {
            Some(c) if Portal::owns(s, c) => Ok(ClientView::of(c, now_unix())),
            _ => Err(PageError::NotFound),
        }
    }

    async fn client_page(&self, s: &Signed, id: &str, flash: Option<Flash>, status: u16) -> Page {
        let mut view = self.owned_client(s, id)?;
        self.fill_last_used(&mut view).await?;
        Ok(self.html(
            status,
            "{portal}/clients/{client_id}",
            pages::client(
                self,
                s,
                &view,
                &self.tenant_names(&s.tenants),
                flash.as_ref(),
            ),
        ))
    }

    async fn revoke_page(&self, s: &Signed, id: &str, sid: &str) -> Page {
        let mut view = self.owned_client(s, id)?;
        self.fill_last_used(&mut view).await?;
        let Some(x) = view.secrets.iter().find(|x| x.id == sid) else {
            return Err(PageError::NotFound);
        };
        Ok(self.html(
            200,
            "{portal}/clients/{client_id}/secrets/{secret_id}/revoke",
            pages::revoke(self, s, &view, x),
        ))
    }

    /// Adds when each secret was last used (the store's record and this replica's newer uses).
    async fn fill_last_used(&self, view: &mut ClientView) -> Result<(), PageError> {
        let mut used = self.store.last_used(&view.id).await?;
        for (sid, at) in self.token.usage.pending_for(&view.id) {
            let e = used.entry(sid).or_insert(0);
            *e = (*e).max(at);
        }
        for secret in &mut view.secrets {
            secret.last_used = used.get(&secret.id).copied();
        }
        Ok(())
    }

    async fn add_secret(&self, req: &Request, s: &Signed, id: &str, now: u64) -> Page {
        let form = Form::parse(req)?;
        Portal::check_csrf(req, &form, s)?;
        let view = self.owned_client(s, id)?;
        let (description, expires) = match Portal::secret_fields(&form, now) {
            Ok(f) => f,
            Err(p) => return self.client_page(s, id, Some(Flash::Error(p)), 400).await,
        };
        let (mut change, issued) = new_client_secret(id, None, now).map_err(unavailable)?;
        if let Change::AddSecret { secret, .. } = &mut change {
            secret.description = description;
            secret.expires = Some(crate::time::format_rfc3339(expires));
        }
        self.token
            .clients
            .apply(change)
            .await
            .map_err(store_error)?;
        let r = self.html(
            201,
            "{portal}/clients/{client_id}/secrets",
            pages::secret_shown(
                self,
                s,
                id,
                &view.name,
                &issued.secret_id,
                &issued.secret,
                expires,
                false,
            ),
        );
        self.acted(
            req,
            r,
            &s.account.id,
            "secret_added",
            Some(id),
            Some(&issued.secret_id),
            now,
        )
        .await
    }

    async fn revoke_secret(
        &self,
        req: &Request,
        s: &Signed,
        id: &str,
        sid: &str,
        now: u64,
    ) -> Page {
        let form = Form::parse(req)?;
        Portal::check_csrf(req, &form, s)?;
        let view = self.owned_client(s, id)?;
        if !view.secrets.iter().any(|x| x.id == sid) {
            return Err(PageError::NotFound);
        }
        let change = Change::RevokeSecret {
            client_id: id.to_string(),
            secret_id: sid.to_string(),
            keep_one: true,
        };
        match self.token.clients.apply(change).await {
            Ok(()) => {}
            Err(StoreError::LastSecret) => {
                return self
                    .client_page(
                        s,
                        id,
                        Some(Flash::Error(
                            "This is the client's only secret. Add a new secret first, or delete the client.".into(),
                        )),
                        409,
                    )
                    .await;
            }
            Err(StoreError::NoSecret(_) | StoreError::NoClient(_)) => {
                return Err(PageError::NotFound)
            }
            Err(e) => return Err(store_error(e)),
        }
        let r = self.redirect(
            "{portal}/clients/{client_id}/secrets/{secret_id}/revoke",
            &format!("/clients/{id}"),
        );
        self.acted(
            req,
            r,
            &s.account.id,
            "secret_revoked",
            Some(id),
            Some(sid),
            now,
        )
        .await
    }

    async fn delete_client(&self, req: &Request, s: &Signed, id: &str, now: u64) -> Page {
        let form = Form::parse(req)?;
        Portal::check_csrf(req, &form, s)?;
        self.owned_client(s, id)?;
        if form.get("confirm") != Some("yes") {
            return self
                .client_page(
                    s,
                    id,
                    Some(Flash::Error("Tick the box to confirm the deletion.".into())),
                    400,
                )
                .await;
        }
        match self
            .token
            .clients
            .apply(Change::Remove {
                client_id: id.to_string(),
            })
            .await
        {
            Ok(()) => {}
            Err(StoreError::NoClient(_)) => return Err(PageError::NotFound),
            Err(e) => return Err(store_error(e)),
        }
        let r = self.redirect("{portal}/clients/{client_id}/delete", "/clients");
        self.acted(req, r, &s.account.id, "client_deleted", Some(id), None, now)
            .await
    }
}

impl ClientView {
    fn of(c: &Client, now: u64) -> ClientView {
        let mut tenants: Vec<String> = match &c.allowed {
            Allowed::All => vec!["*".into()],
            Allowed::Only(set) => set.iter().map(ToString::to_string).collect(),
        };
        tenants.sort();
        ClientView {
            id: c.id.clone(),
            name: c.name.clone(),
            disabled: c.disabled,
            tenants,
            secrets: c
                .secrets
                .iter()
                .map(|x| SecretView {
                    id: x.id.clone(),
                    description: x.description.clone(),
                    created: x.created,
                    expires: x.expires,
                    live: x.is_live(now),
                    last_used: None,
                })
                .collect(),
        }
    }
}

/// A new random token (a session id, a CSRF token).
fn new_token() -> Result<String, PageError> {
    account::random_token().map_err(unavailable)
}

/// A failure the owner can do nothing about (no randomness, a hashing task lost): logged, and
/// answered as the portal being unavailable.
fn unavailable(e: impl std::fmt::Display) -> PageError {
    log::error!("portal: {e}");
    PageError::Unavailable
}

fn store_error(e: StoreError) -> PageError {
    log::warn!("portal: the client registry refused a change: {e}");
    PageError::Unavailable
}

fn stylesheet() -> Reply {
    Reply {
        status: 200,
        headers: vec![
            ("content-type", "text/css; charset=utf-8".into()),
            ("cache-control", "public, max-age=3600".into()),
            ("x-content-type-options", "nosniff".into()),
        ],
        body: bytes::Bytes::from_static(include_bytes!("portal.css")),
        template: "{portal}/static/portal.css",
        action: None,
        account: None,
        client_id: None,
    }
}
