//! One tenant's entry checked field by field and turned into the parts of its route: the name, the
//! upstream headers (environment references expanded, reserved names refused) and the upstream
//! (URL, TLS, SNI, timeouts, link bases, CA file, address).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};

use crate::config::limits::TenantLimits;
use crate::config::routes::TenantEntry;
use crate::routing::nodes::Upstreams;
use crate::routing::upstream::{read_ca_file, Upstream, UpstreamUrl};
use crate::routing::TableContext;

/// Why an entry does not build: the field, text to locate it by in the file (empty: the entry's
/// key), and what is wrong. Never the value of a header: it may be a credential.
#[derive(Debug)]
pub(super) struct Invalid {
    pub(super) field: &'static str,
    pub(super) needle: String,
    pub(super) message: String,
}

/// A problem with a key of the route's `limits`.
pub(super) fn invalid_limit(key: &'static str, message: String) -> Invalid {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    let field = match key {
        "requests_per_second" => "limits.requests_per_second",
        "burst" => "limits.burst",
        "max_in_flight" => "limits.max_in_flight",
        "per_client.requests_per_second" => "limits.per_client.requests_per_second",
        _ => "limits.per_client.burst",
    };
    invalid(field, leaf, message)
}

fn invalid(field: &'static str, needle: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        field,
        needle: needle.to_string(),
        message: message.into(),
    }
}

/// Headers an operator may not set: they frame the message or carry routing decisions that belong to
/// the proxy.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "forwarded",
];

pub(super) fn check_name(entry: &TenantEntry<'_>) -> Result<(), Invalid> {
    let name = &entry.name;
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(invalid(
            "name",
            name,
            "must be 1-64 characters of A-Z a-z 0-9 - _ .",
        ));
    }
    Ok(())
}

pub(super) fn headers(
    entry: &TenantEntry<'_>,
) -> Result<Box<[(HeaderName, HeaderValue)]>, Invalid> {
    let given = &entry.upstream_headers.0;
    let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(given.len());
    for (raw_name, raw_value) in given {
        let err = |m: String| invalid("upstream_headers", raw_name, m);
        let name = HeaderName::from_bytes(raw_name.as_bytes())
            .map_err(|_| err(format!("`{raw_name}` is not a header name")))?;
        if RESERVED_HEADERS.contains(&name.as_str()) {
            return Err(err(format!(
                "`{raw_name}` is set by the proxy and may not be configured"
            )));
        }
        // Header names are case-insensitive (RFC 9110 §5.1): `X-Key` and `x-key` are one header.
        if headers.iter().any(|(n, _)| *n == name) {
            return Err(err(format!("`{raw_name}` is given twice")));
        }
        // The value may hold a credential: messages name the header, never the value.
        let expanded = expand_env(raw_value).map_err(|m| err(format!("{raw_name}: {m}")))?;
        let mut value = HeaderValue::from_str(&expanded)
            .map_err(|_| err(format!("{raw_name}: value is not a valid header value")))?;
        value.set_sensitive(true);
        headers.push((name, value));
    }
    Ok(headers.into_boxed_slice())
}

/// The most nodes one tenant may name.
const MAX_NODES: usize = 16;

/// The nodes an entry names (`upstream`, or `upstreams`), checked, resolved as the context says,
/// and built, each with its server's health from the context's registry.
pub(super) fn upstreams(
    entry: &TenantEntry<'_>,
    dir: &Path,
    ctx: &TableContext,
    limits: TenantLimits,
) -> Result<Upstreams, Invalid> {
    let written: Vec<&str> = match (&entry.upstream, entry.upstreams.as_slice()) {
        (Some(one), []) => vec![one],
        (None, []) => {
            return Err(invalid(
                "upstream",
                "",
                "is required (the tenant's FHIR base URL; or `upstreams`, a list of them)",
            ))
        }
        (None, list) if list.len() > MAX_NODES => {
            return Err(invalid(
                "upstreams",
                "upstreams",
                format!("names more than {MAX_NODES} nodes"),
            ))
        }
        (None, list) => list.iter().map(|u| &**u).collect(),
        (Some(_), _) => {
            return Err(invalid(
                "upstreams",
                "upstreams",
                "give `upstream` or `upstreams`, not both",
            ))
        }
    };
    let field = if entry.upstream.is_some() {
        "upstream"
    } else {
        "upstreams"
    };
    let mut urls: Vec<UpstreamUrl> = Vec::with_capacity(written.len());
    for w in &written {
        let url = UpstreamUrl::parse(w).map_err(|m| invalid(field, w, m))?;
        if urls.iter().any(|u| u.base_url() == url.base_url()) {
            return Err(invalid(field, w, "names the same node twice"));
        }
        if !url.tls && !entry.tls_verify {
            return Err(invalid(
                "tls_verify",
                "tls_verify",
                "only applies to https upstreams",
            ));
        }
        if entry.sni.is_some() && !url.tls {
            return Err(invalid("sni", "sni", "only applies to https upstreams"));
        }
        urls.push(url);
    }
    if let Some(sni) = &entry.sni {
        if !is_host_name(sni) {
            return Err(invalid(
                "sni",
                "sni",
                "must be a DNS host name (labels of A-Z a-z 0-9 - _, at most 253 characters)",
            ));
        }
    }
    // Group 0 in the shared peer; each request's copy gets the tenant's group.
    let mut settings = ctx.defaults.peer_settings(0);
    settings.tls_verify = entry.tls_verify;
    settings.sni = entry.sni.as_deref().map(str::to_string);
    if let Some(ms) = entry.connect_timeout_ms {
        settings.connect_timeout =
            timeout(ms).map_err(|m| invalid("connect_timeout_ms", "connect_timeout_ms", m))?;
    }
    if let Some(ms) = entry.read_timeout_ms {
        settings.read_timeout =
            timeout(ms).map_err(|m| invalid("read_timeout_ms", "read_timeout_ms", m))?;
    }
    for b in &entry.link_bases {
        let parsed = UpstreamUrl::parse(b).map_err(|m| invalid("link_bases", b, m))?;
        settings.link_bases.push(parsed.base_url());
    }
    // Each node's links may name the others (nodes behind one database).
    if urls.len() > 1 {
        settings
            .link_bases
            .extend(urls.iter().map(UpstreamUrl::base_url));
    }
    if let Some(ca) = &entry.ca_file {
        let der = read_ca_file(&dir.join(&**ca)).map_err(|m| invalid("ca_file", ca, m))?;
        settings.ca_der = Some(der);
    }
    let mut nodes = Vec::with_capacity(urls.len());
    for (url, w) in urls.iter().zip(&written) {
        // A host that does not resolve makes its node unavailable, not the table invalid: one
        // hospital's DNS must not freeze every other tenant's routing edits (or the start).
        let (addr, unresolved) = match ctx.resolve.address(url) {
            Ok(addr) => (addr, None),
            Err(m) => (
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), url.port),
                Some(m.into_boxed_str()),
            ),
        };
        let health = ctx.state.nodes.node(&url.node_label());
        let mut upstream =
            Upstream::build(url, addr, &settings, health).map_err(|m| invalid(field, w, m))?;
        upstream.unresolved = unresolved;
        let upstream = Arc::new(upstream);
        upstream.health.set_target(&upstream);
        nodes.push(upstream);
    }
    Ok(Upstreams::new(nodes, entry.balance, limits))
}

/// A DNS host name as TLS SNI carries it (RFC 6066 §3: no IP literals): dot-separated labels of 1-63
/// letters, digits, `-` (not at either end) or `_` (seen in internal names), 253 characters at most,
/// an optional final dot. Checked when the table loads so a typo, a control character or an address
/// fails there, with the file and line, instead of on every request's TLS handshake.
fn is_host_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.parse::<std::net::IpAddr>().is_err()
        && s.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn timeout(ms: u64) -> Result<Duration, String> {
    if (1..=3_600_000).contains(&ms) {
        Ok(Duration::from_millis(ms))
    } else {
        Err("must be between 1 and 3600000".into())
    }
}

/// Replaces `${NAME}` with the environment variable `NAME`. A missing variable is an error that names
/// the variable (never its value). `$` not followed by `{` is kept as is.
pub(super) fn expand_env(value: &str) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${…} reference".to_string())?;
        let name = &after[..end];
        if name.is_empty()
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            || name.as_bytes()[0].is_ascii_digit()
        {
            return Err(format!("`${{{name}}}` is not a valid variable reference"));
        }
        let v =
            std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?;
        out.push_str(&v);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}
