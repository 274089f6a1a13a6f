//! The portal's pages, as maud templates: every value is escaped by the template engine, no page
//! has a script, every action is a form. Labels on every control, a skip link, landmarks, and the
//! stylesheet's colours meet WCAG AA contrast.

use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::handlers::EXPIRY_DAYS;
use super::store::Activity;
use super::{Portal, Signed};
use crate::time::format_rfc3339;

/// A one-line message at the top of a page.
pub(crate) enum Flash {
    Ok(String),
    Error(String),
}

/// A client as its pages show it.
pub(crate) struct ClientView {
    pub id: String,
    pub name: String,
    pub disabled: bool,
    pub tenants: Vec<String>,
    pub secrets: Vec<SecretView>,
}

pub(crate) struct SecretView {
    pub id: String,
    pub description: Option<String>,
    pub created: u64,
    pub expires: Option<u64>,
    pub live: bool,
    pub last_used: Option<u64>,
}

/// `2026-12-06 14:03 UTC`.
fn when(t: u64) -> String {
    let s = format_rfc3339(t);
    format!(
        "{} {} UTC",
        s.get(..10).unwrap_or_default(),
        s.get(11..16).unwrap_or_default()
    )
}

fn flash(f: Option<&Flash>) -> Markup {
    html! {
        @match f {
            Some(Flash::Ok(m)) => p.flash.ok role="status" { (m) },
            Some(Flash::Error(m)) => p.flash.error role="alert" { (m) },
            None => {}
        }
    }
}

fn csrf(s: &Signed) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.session.csrf); }
}

/// The frame of every page.
fn layout(p: &Portal, s: Option<&Signed>, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · fhir-edge client portal" }
                link rel="stylesheet" href=(p.link("/static/portal.css"));
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    span.brand { "fhir-edge · client portal" }
                    @if let Some(s) = s {
                        nav aria-label="Main" {
                            a href=(p.link("/clients")) { "Clients" }
                            a href=(p.link("/activity")) { "Activity" }
                            a href=(p.link("/account")) { "Account" }
                            form.inline method="post" action=(p.link("/logout")) {
                                (csrf(s))
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

pub(super) fn message(p: &Portal, s: Option<&Signed>, title: &str, text: &str) -> Markup {
    layout(p, s, title, html! { p { (text) } })
}

pub(super) fn login(p: &Portal, csrf: &str, email: &str, f: Option<&Flash>) -> Markup {
    layout(
        p,
        None,
        "Sign in",
        html! {
            (flash(f))
            form.card method="post" action=(p.link("/login")) {
                input type="hidden" name="csrf" value=(csrf);
                label for="email" { "E-mail address" }
                input id="email" name="email" type="email" autocomplete="username" required value=(email);
                label for="password" { "Password" }
                input id="password" name="password" type="password" autocomplete="current-password" required;
                label for="code" { "Authenticator code or recovery code" }
                p.hint id="code-hint" { "Only if you turned on two-step sign-in. Each code works once: if you just used one, wait for the next." }
                input id="code" name="code" type="text" inputmode="numeric" autocomplete="one-time-code" aria-describedby="code-hint";
                button type="submit" { "Sign in" }
            }
            p.hint { "No account? Your operator sends you an invitation link." }
        },
    )
}

pub(super) fn invite(
    p: &Portal,
    token: &str,
    email: &str,
    csrf: &str,
    f: Option<&Flash>,
) -> Markup {
    layout(
        p,
        None,
        "Choose your password",
        html! {
            (flash(f))
            p { "You are setting the password of " strong { (email) } "." }
            form.card method="post" action=(p.link(&format!("/invite/{token}"))) {
                input type="hidden" name="csrf" value=(csrf);
                input type="text" name="username" value=(email) autocomplete="username" hidden;
                label for="password" { "New password" }
                p.hint id="pw-hint" {
                    "At least " (p.cfg.min_password_length) " characters, without your e-mail address or the product's name. A passphrase of several words works well."
                }
                input id="password" name="password" type="password" autocomplete="new-password" required minlength=(p.cfg.min_password_length) aria-describedby="pw-hint";
                label for="confirm" { "The same password again" }
                input id="confirm" name="confirm" type="password" autocomplete="new-password" required;
                button type="submit" { "Set password and sign in" }
            }
        },
    )
}

pub(super) fn password(p: &Portal, s: &Signed, f: Option<&Flash>) -> Markup {
    layout(
        p,
        Some(s),
        "Change password",
        html! {
            (flash(f))
            p { "Changing your password signs you out everywhere." }
            form.card method="post" action=(p.link("/account/password")) {
                (csrf(s))
                input type="text" name="username" value=(s.account.email) autocomplete="username" hidden;
                label for="current" { "Current password" }
                input id="current" name="current" type="password" autocomplete="current-password" required;
                label for="password" { "New password" }
                p.hint id="pw-hint" { "At least " (p.cfg.min_password_length) " characters." }
                input id="password" name="password" type="password" autocomplete="new-password" required minlength=(p.cfg.min_password_length) aria-describedby="pw-hint";
                label for="confirm" { "The same password again" }
                input id="confirm" name="confirm" type="password" autocomplete="new-password" required;
                button type="submit" { "Change password" }
            }
        },
    )
}

/// A QR code of `text` as inline SVG (numbers only in the path, so it is safe unescaped).
fn qr(text: &str) -> Markup {
    use qrcodegen::{QrCode, QrCodeEcc};
    let Ok(code) = QrCode::encode_text(text, QrCodeEcc::Medium) else {
        return html! {};
    };
    let size = code.size();
    let mut path = String::new();
    for y in 0..size {
        for x in 0..size {
            if code.get_module(x, y) {
                path.push_str(&format!("M{},{}h1v1h-1z", x + 4, y + 4));
            }
        }
    }
    let view = size + 8;
    html! {
        svg.qr xmlns="http://www.w3.org/2000/svg" viewBox=(format!("0 0 {view} {view}")) role="img" aria-label="QR code of the set-up key" {
            rect width="100%" height="100%" fill="#ffffff" {}
            path d=(PreEscaped(path)) fill="#000000" {}
        }
    }
}

pub(super) fn totp_setup(
    p: &Portal,
    s: &Signed,
    secret: &str,
    uri: &str,
    f: Option<&Flash>,
    required: bool,
) -> Markup {
    layout(
        p,
        Some(s),
        "Two-step sign-in",
        html! {
            (flash(f))
            @if required {
                p.flash.error role="alert" { "Your operator requires two-step sign-in. Set it up to continue." }
            }
            ol.steps {
                li { "Open an authenticator app (Microsoft Authenticator, Google Authenticator, 1Password, …)." }
                li {
                    "Scan this code, or enter the key by hand:"
                    (qr(uri))
                    p { code.key id="totp-key" { (secret) } }
                }
                li { "Enter the six-digit code the app shows." }
            }
            form.card method="post" action=(p.link("/account/totp")) {
                (csrf(s))
                input type="hidden" name="secret" value=(secret);
                label for="code" { "Code from the app" }
                input id="code" name="code" type="text" inputmode="numeric" autocomplete="one-time-code" required pattern="[0-9 ]{6,7}";
                button type="submit" { "Turn on two-step sign-in" }
            }
            @if !required {
                p { a href=(p.link("/clients")) { "Not now: go to my clients" } }
            }
        },
    )
}

pub(super) fn totp_enabled(p: &Portal, s: &Signed) -> Markup {
    layout(
        p,
        Some(s),
        "Two-step sign-in",
        html! {
            p { "Two-step sign-in is on. You have " (s.account.recovery_codes.len()) " unused recovery codes." }
            p.hint { "Lost your device? Sign in with a recovery code, or ask your operator to reset two-step sign-in." }
        },
    )
}

pub(super) fn recovery_codes(p: &Portal, s: &Signed, codes: &[String]) -> Markup {
    layout(
        p,
        Some(s),
        "Save your recovery codes",
        html! {
            p.flash.ok role="status" { "Two-step sign-in is on." }
            p { "Each code signs you in once if you lose your device. Keep them somewhere safe: they are shown only now." }
            ul.codes { @for c in codes { li { code { (c) } } } }
            p { a.button href=(p.link("/clients")) { "I saved them: go to my clients" } }
        },
    )
}

fn tenant_label(tenants: &[(String, Option<String>)], guid: &str) -> Markup {
    let name = tenants
        .iter()
        .find(|(g, _)| g == guid)
        .and_then(|(_, n)| n.as_deref());
    html! {
        @if let Some(n) = name { (n) " " }
        code { (guid) }
    }
}

pub(super) fn account(
    p: &Portal,
    s: &Signed,
    tenants: &[(String, Option<String>)],
    f: Option<&Flash>,
) -> Markup {
    layout(
        p,
        Some(s),
        "Account",
        html! {
            (flash(f))
            dl {
                dt { "E-mail address" } dd { (s.account.email) }
                dt { "Tenants" }
                dd { ul { @for (g, _) in tenants { li { (tenant_label(tenants, g)) } } } }
                dt { "Two-step sign-in" }
                dd {
                    @if s.account.totp_secret.is_some() { "On" } @else {
                        "Off · " a href=(p.link("/account/totp")) { "turn it on" }
                    }
                }
            }
            p { a href=(p.link("/account/password")) { "Change password" } }
        },
    )
}

fn action_text(a: &str) -> &str {
    match a {
        "signed_in" => "Signed in",
        "sign_in_failed" => "Failed sign-in",
        "signed_out" => "Signed out",
        "password_set" => "Password set from an invitation",
        "password_changed" => "Password changed",
        "totp_enabled" => "Two-step sign-in turned on",
        "client_created" => "Client created",
        "secret_added" => "Secret added",
        "secret_revoked" => "Secret revoked",
        "client_deleted" => "Client deleted",
        "invited" => "Invited by the operator",
        "reset" => "Reset by the operator",
        "disabled" => "Disabled by the operator",
        "enabled" => "Enabled by the operator",
        other => other,
    }
}

pub(super) fn activity(p: &Portal, s: &Signed, entries: &[Activity]) -> Markup {
    layout(
        p,
        Some(s),
        "Activity",
        html! {
            @if entries.is_empty() { p { "Nothing yet." } } @else {
                table {
                    caption { "Your latest actions, newest first" }
                    thead { tr { th scope="col" { "When" } th scope="col" { "What" } th scope="col" { "Client" } th scope="col" { "Secret" } th scope="col" { "From" } } }
                    tbody {
                        @for e in entries {
                            tr {
                                td { (when(e.at)) }
                                td { (action_text(&e.action)) }
                                td { @if let Some(c) = &e.client_id { code { (c) } } }
                                td { @if let Some(x) = &e.secret_id { code { (x) } } }
                                td { (e.source.as_deref().unwrap_or("")) }
                            }
                        }
                    }
                }
            }
        },
    )
}

pub(super) fn clients(
    p: &Portal,
    s: &Signed,
    tenants: &[(String, Option<String>)],
    clients: &[ClientView],
    f: Option<&Flash>,
) -> Markup {
    layout(
        p,
        Some(s),
        "My clients",
        html! {
            (flash(f))
            h2 { "My tenants" }
            ul { @for (g, _) in tenants { li { (tenant_label(tenants, g)) } } }
            h2 { "Clients" }
            @if clients.is_empty() { p { "No clients yet." } } @else {
                table {
                    thead { tr { th scope="col" { "Name" } th scope="col" { "Client ID" } th scope="col" { "Tenants" } th scope="col" { "Live secrets" } } }
                    tbody {
                        @for c in clients {
                            tr {
                                td { a href=(p.link(&format!("/clients/{}", c.id))) { (c.name) } @if c.disabled { " (disabled)" } }
                                td { code { (c.id) } }
                                td { @for t in &c.tenants { (tenant_label(tenants, t)) br; } }
                                td { (c.secrets.iter().filter(|x| x.live).count()) }
                            }
                        }
                    }
                }
            }
            p { a.button href=(p.link("/clients/new")) { "Create a client" } }
        },
    )
}

fn expiry_select() -> Markup {
    html! {
        label for="expires_days" { "Expires after" }
        select id="expires_days" name="expires_days" {
            @for d in EXPIRY_DAYS {
                option value=(d) selected[*d == 180] {
                    @match d { 365 => "1 year", 730 => "2 years", d => (format!("{d} days")) }
                }
            }
        }
    }
}

pub(super) fn new_client(
    p: &Portal,
    s: &Signed,
    tenants: &[(String, Option<String>)],
    f: Option<&Flash>,
) -> Markup {
    layout(
        p,
        Some(s),
        "Create a client",
        html! {
            (flash(f))
            form.card method="post" action=(p.link("/clients/new")) {
                (csrf(s))
                label for="name" { "Name" }
                input id="name" name="name" type="text" required maxlength="128";
                fieldset {
                    legend { "Tenants it may ask tokens for" }
                    @for (i, (g, _)) in tenants.iter().enumerate() {
                        div.check {
                            input id=(format!("tenant-{i}")) type="checkbox" name="tenant" value=(g) checked[tenants.len() == 1];
                            label for=(format!("tenant-{i}")) { (tenant_label(tenants, g)) }
                        }
                    }
                }
                label for="description" { "Description of its first secret" }
                input id="description" name="description" type="text" maxlength="100" placeholder="e.g. production";
                (expiry_select())
                button type="submit" { "Create client" }
            }
        },
    )
}

pub(super) fn client(
    p: &Portal,
    s: &Signed,
    c: &ClientView,
    tenants: &[(String, Option<String>)],
    f: Option<&Flash>,
) -> Markup {
    let base = format!("/clients/{}", c.id);
    layout(
        p,
        Some(s),
        &c.name,
        html! {
            (flash(f))
            dl {
                dt { "Client ID" } dd { code id="client-id" { (c.id) } }
                dt { "Tenants" } dd { @for t in &c.tenants { (tenant_label(tenants, t)) br; } }
                @if c.disabled { dt { "State" } dd { "Disabled by the operator" } }
            }
            h2 { "Secrets" }
            table {
                thead { tr { th scope="col" { "ID" } th scope="col" { "Description" } th scope="col" { "Created" } th scope="col" { "Expires" } th scope="col" { "Last used" } th scope="col" { span.sr-only { "Actions" } } } }
                tbody {
                    @for x in &c.secrets {
                        tr {
                            td { code { (x.id) } }
                            td { (x.description.as_deref().unwrap_or("")) }
                            td { (when(x.created)) }
                            td { @match x.expires { Some(e) => (when(e)), None => "never" } @if !x.live { " (expired)" } }
                            td { @match x.last_used { Some(u) => (when(u)), None => "never" } }
                            td {
                                a.button.danger href=(p.link(&format!("{base}/secrets/{}/revoke", x.id))) aria-label=(format!("Revoke secret {}", x.id)) { "Revoke" }
                            }
                        }
                    }
                }
            }
            h2 { "Add a secret" }
            p.hint { "The old secrets keep working until you revoke them, so you can switch over without downtime." }
            form.card method="post" action=(p.link(&format!("{base}/secrets"))) {
                (csrf(s))
                label for="description" { "Description" }
                input id="description" name="description" type="text" maxlength="100" placeholder="e.g. rotated December";
                (expiry_select())
                button type="submit" { "Add secret" }
            }
            h2 { "Delete this client" }
            form.card method="post" action=(p.link(&format!("{base}/delete"))) {
                (csrf(s))
                div.check {
                    input id="confirm" type="checkbox" name="confirm" value="yes";
                    label for="confirm" { "I understand that every token of this client stops working at once." }
                }
                button.danger type="submit" { "Delete client" }
            }
        },
    )
}

pub(super) fn revoke(p: &Portal, s: &Signed, c: &ClientView, x: &SecretView) -> Markup {
    let base = format!("/clients/{}", c.id);
    layout(
        p,
        Some(s),
        "Revoke a secret?",
        html! {
            dl {
                dt { "Client" } dd { (c.name) " " code { (c.id) } }
                dt { "Secret" } dd { code { (x.id) } }
                dt { "Description" } dd { (x.description.as_deref().unwrap_or("")) }
                dt { "Last used" } dd { @match x.last_used { Some(u) => (when(u)), None => "never" } }
            }
            p { "The secret stops working at once, and so does every token obtained with it. The client's other secrets keep working. This cannot be undone." }
            form.card method="post" action=(p.link(&format!("{base}/secrets/{}/revoke", x.id))) {
                (csrf(s))
                button.danger type="submit" { "Revoke secret" }
            }
            p { a href=(p.link(&base)) { "Cancel" } }
        },
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) fn secret_shown(
    p: &Portal,
    s: &Signed,
    client_id: &str,
    name: &str,
    secret_id: &str,
    secret: &str,
    expires: u64,
    new_client: bool,
) -> Markup {
    layout(
        p,
        Some(s),
        if new_client {
            "Client created"
        } else {
            "Secret added"
        },
        html! {
            p.flash.ok role="status" { "Copy the secret now: it is shown only once and cannot be recovered." }
            dl {
                dt { "Client" } dd { (name) }
                dt { "Client ID" } dd { code id="client-id" { (client_id) } }
                dt { "Secret ID" } dd { code id="secret-id" { (secret_id) } }
                dt { "Client secret" } dd { code.secret id="client-secret" { (secret) } }
                dt { "Expires" } dd { (when(expires)) }
            }
            p { "Ask for tokens at " code { (p.token.settings.url) } " with grant type " code { "client_credentials" } " and your tenant's GUID as the scope." }
            p { a.button href=(p.link(&format!("/clients/{client_id}"))) { "Go to the client" } }
        },
    )
}
