//! The token's `scope` claim → the one tenant it grants.
//!
//! Teams EHR integration: the client asks for a token with `scope=<tenant GUID>`; the proxy routes on the
//! tenant in the *verified* token's scope and on nothing else. RFC 6749 §3.3 makes scope a string of
//! space-delimited tokens; SMART scopes such as `system/*.read` may ride along and are ignored here.
//! Exactly one element must be a canonical GUID. A scope that names a tenant in any other spelling
//! (braces, `urn:uuid:`, no hyphens) is refused as a whole rather than half-understood.

use super::AuthFailure;
use crate::tenant::TenantId;

/// The tenant granted by a `scope` claim (a string by then: the verifier refuses other types).
pub fn tenant_from_scope(scope: Option<&str>) -> Result<TenantId, AuthFailure> {
    scope.and_then(tenant_in).ok_or(AuthFailure::NoTenant)
}

/// The most elements a scope may have. A longer one is refused after this many are read, so a
/// token (or a token request) with thousands of scope entries costs no more than this.
pub(crate) const MAX_SCOPE_ELEMENTS: usize = 256;

/// The one tenant a space-delimited scope string names, if it names exactly one, canonically. Shared
/// by token verification and the token endpoint, so both read a scope the same way.
pub fn tenant_in(scope: &str) -> Option<TenantId> {
    let mut found = None;
    for (i, element) in scope.split(' ').enumerate() {
        if i == MAX_SCOPE_ELEMENTS {
            return None;
        }
        if let Some(t) = TenantId::parse(element) {
            if found.replace(t).is_some() {
                return None;
            }
        } else if TenantId::is_non_canonical_spelling(element) {
            return None;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "145f4184-1b0b-41c7-ba24-b3c1291bfda1";

    #[test]
    fn one_guid_among_other_scopes() {
        let want = TenantId::parse(T);
        assert_eq!(tenant_from_scope(Some(T)).ok(), want);
        assert_eq!(
            tenant_from_scope(Some(&format!("system/*.read {T}"))).ok(),
            want
        );
        assert_eq!(
            tenant_from_scope(Some(&T.to_uppercase())).ok(),
            want,
            "uppercase GUIDs name the same tenant"
        );
    }

    #[test]
    fn a_scope_of_thousands_of_entries_is_refused_after_the_bound() {
        let within = format!(
            "{} {T}",
            "system/*.read ".repeat(MAX_SCOPE_ELEMENTS - 2).trim_end()
        );
        assert_eq!(tenant_in(&within), TenantId::parse(T));
        let huge = format!("{T} {}", "system/*.read ".repeat(10_000));
        assert_eq!(tenant_in(&huge), None);
    }

    #[test]
    fn anything_else_grants_no_tenant() {
        let other = "00000000-0000-0000-0000-000000000001";
        for bad in [
            format!("{T} {other}"),
            format!("{T} {T}"),
            format!("{T} {{{other}}}"),
            format!("{{{T}}}"),
            format!("urn:uuid:{T}"),
            T.replace('-', ""),
            "system/*.read".to_string(),
            String::new(),
            format!("{T}\t"),
        ] {
            assert_eq!(
                tenant_from_scope(Some(bad.as_str())),
                Err(AuthFailure::NoTenant),
                "{bad}"
            );
        }
        assert_eq!(tenant_from_scope(None), Err(AuthFailure::NoTenant));
    }
}
