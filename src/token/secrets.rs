//! Client secrets: generating them, storing them as salted digests, checking a presented one.
//!
//! A secret is 32 bytes from the OS (`fes_` + base64url), shown once and stored only as
//! `sha256:<salt>:<digest>`, where the digest is SHA-256 over a domain label, a 16-byte random salt
//! and the secret, compared in constant time ([`subtle`]). A slow password hash (argon2, bcrypt)
//! protects *low-entropy* secrets against offline guessing; these have 256 bits of entropy, so
//! guessing is hopeless either way, and a slow hash would only let anyone make the token endpoint
//! burn CPU. An unknown client costs the same digest work as a client with one secret
//! ([`matches_nothing`]), so neither the answer nor the time tells a caller which client ids exist
//! (RFC 6749 §10.2 asks that client authentication not help an attacker; SPEC §3).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::time::format_rfc3339;

pub(crate) const SALT_LEN: usize = 16;
const DOMAIN: &[u8] = b"fhir-edge client secret v1\0";

/// Stands in for the stored secret of a client that does not exist. Its digest is not the digest of
/// any known input, so nothing matches it; it only makes the work the same.
const DUMMY_SALT: [u8; SALT_LEN] = [0x5a; SALT_LEN];
const DUMMY_DIGEST: [u8; 32] = [0xa5; 32];

#[cfg(test)]
thread_local! {
    /// Digests computed by this thread: lets a test see the work an unknown client costs.
    static DIGESTS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn digest(salt: &[u8; SALT_LEN], secret: &[u8]) -> [u8; 32] {
    #[cfg(test)]
    DIGESTS.with(|n| n.set(n.get() + 1));
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(salt);
    h.update(secret);
    h.finalize().into()
}

/// Whether `presented` is the secret stored as (`salt`, `stored`): one digest, compared in constant
/// time.
pub(crate) fn matches(salt: &[u8; SALT_LEN], stored: &[u8; 32], presented: &[u8]) -> bool {
    bool::from(digest(salt, presented).ct_eq(stored))
}

/// The work of [`matches`] against a dummy stored secret, for a client id that does not exist.
/// Nothing matches the dummy, so the answer is always no.
pub(crate) fn matches_nothing(presented: &[u8]) {
    // `black_box` keeps the compiler from dropping a comparison whose result is unused.
    std::hint::black_box(matches(&DUMMY_SALT, &DUMMY_DIGEST, presented));
}

/// The salt and digest of a stored `sha256:<salt, base64url>:<digest, base64url>`.
pub(crate) fn parse_hash(h: &str) -> Option<([u8; SALT_LEN], [u8; 32])> {
    let mut parts = h.split(':');
    let (Some("sha256"), Some(salt), Some(dig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let salt: [u8; SALT_LEN] = B64.decode(salt).ok()?.try_into().ok()?;
    let dig: [u8; 32] = B64.decode(dig).ok()?.try_into().ok()?;
    Some((salt, dig))
}

fn random<const N: usize>() -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| format!("no randomness from the OS: {e}"))?;
    Ok(b)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|x| format!("{x:02x}")).collect()
}

/// A new client id: a random (version 4) UUID, like Azure AD application ids.
pub(crate) fn new_client_id() -> Result<String, String> {
    let mut b = random::<16>()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// A freshly generated secret: the value to hand out once, and the entry to store.
pub(crate) struct NewSecret {
    pub secret: String,
    pub entry: super::clients::SecretEntry,
}

/// Generates a 256-bit secret and its stored form.
pub(crate) fn new_secret(now: u64, expires: Option<u64>) -> Result<NewSecret, String> {
    let secret = format!("fes_{}", B64.encode(random::<32>()?));
    let salt = random::<SALT_LEN>()?;
    let created = format_rfc3339(now);
    let date = created.get(..10).unwrap_or_default().replace('-', "");
    let id = format!("s-{date}-{}", hex(&random::<4>()?));
    let hash = format!(
        "sha256:{}:{}",
        B64.encode(salt),
        B64.encode(digest(&salt, secret.as_bytes()))
    );
    Ok(NewSecret {
        secret,
        entry: super::clients::SecretEntry {
            id,
            hash,
            created,
            expires: expires.map(format_rfc3339),
            description: None,
        },
    })
}

/// Digests this thread has computed so far.
#[cfg(test)]
pub(crate) fn digests_so_far() -> usize {
    DIGESTS.with(std::cell::Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_secret_matches_only_itself() {
        let s = new_secret(1_000, None).unwrap();
        assert!(s.secret.starts_with("fes_") && s.secret.len() >= 47);
        let (salt, stored) = parse_hash(&s.entry.hash).unwrap();
        assert!(matches(&salt, &stored, s.secret.as_bytes()));
        assert!(!matches(&salt, &stored, b"fes_wrong"));
        assert!(!matches(&DUMMY_SALT, &DUMMY_DIGEST, s.secret.as_bytes()));
        assert!(parse_hash("md5:x:y").is_none());
        assert!(parse_hash(&format!("{}:extra", s.entry.hash)).is_none());
    }

    #[test]
    fn the_dummy_check_costs_one_digest_like_a_real_one() {
        let before = digests_so_far();
        matches_nothing(b"anything");
        assert_eq!(digests_so_far() - before, 1);
    }
}
