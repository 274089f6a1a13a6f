//! An owner's credentials: the password rules, argon2id hashing, RFC 6238 TOTP and recovery codes,
//! and the random values (invite tokens, session ids, CSRF tokens) the portal hands out.
//!
//! Hashing and verifying a password costs tens of milliseconds of CPU by design (argon2id with the
//! OWASP parameters: 19 MiB, two passes), so it runs on tokio's blocking pool, never on a worker.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use sha2::{Digest, Sha256};
use totp_rs::{Algorithm, Builder, Secret, Totp};

/// The product name a password may not contain.
const PRODUCT: &str = "fhir-edge";

/// The longest password accepted (argon2 would take any length; a bound keeps hashing cheap to
/// refuse).
pub(crate) const MAX_PASSWORD: usize = 256;

/// Recovery codes issued when TOTP is enabled.
pub(crate) const RECOVERY_CODES: usize = 10;

/// `n` random bytes from the OS.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| format!("no randomness from the OS: {e}"))?;
    Ok(b)
}

/// A random token for a cookie, a link or a form: 32 bytes, base64url.
pub(crate) fn random_token() -> Result<String, String> {
    Ok(B64.encode(random_bytes::<32>()?))
}

/// SHA-256 in hex: how tokens, session ids and recovery codes are stored.
pub(crate) fn sha256_hex(value: &str) -> String {
    Sha256::digest(value.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why a new password is refused (shown to the owner).
pub(crate) fn password_problem(password: &str, email: &str, min_len: usize) -> Option<String> {
    let chars = password.chars().count();
    if chars < min_len {
        return Some(format!("Use at least {min_len} characters."));
    }
    if password.len() > MAX_PASSWORD {
        return Some(format!("Use at most {MAX_PASSWORD} bytes."));
    }
    let lower = password.to_lowercase();
    let local = email.split('@').next().unwrap_or_default().to_lowercase();
    let squashed = lower.replace(['-', '_', ' ', '.'], "");
    // A short local part (`ann`) is inside too many ordinary words to be refused anywhere; from five
    // characters on it is a name, not a syllable.
    if lower.contains(&email.to_lowercase())
        || lower == local
        || (local.chars().count() >= 5 && lower.contains(&local))
    {
        return Some("Do not use your e-mail address or its name part in the password.".into());
    }
    if lower.contains(PRODUCT) || squashed.contains("fhiredge") {
        return Some("Do not use the product's name in the password.".into());
    }
    if password.chars().all(|c| password.starts_with(c)) {
        return Some("Do not repeat one character.".into());
    }
    None
}

fn argon2() -> Argon2<'static> {
    // argon2id, version 0x13, m = 19 MiB, t = 2, p = 1 (the crate's default: OWASP's recommendation).
    Argon2::default()
}

/// Hashes `password` (on the blocking pool).
pub(crate) async fn hash_password(password: String) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        let salt =
            SaltString::encode_b64(&random_bytes::<16>()?).map_err(|e| format!("salt: {e}"))?;
        argon2()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| format!("argon2: {e}"))
    })
    .await
    .map_err(|e| format!("hashing task: {e}"))?
}

/// A stored hash to verify against when an account does not exist, so that an unknown e-mail costs
/// the same time as a wrong password.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$GJ4LzGKBGN9F+VrC3Ebs7yDX1URmZGGVmFrbTfgMl+M";

/// Whether `password` matches `stored` (a PHC string; `None`: compared against a dummy and refused).
pub(crate) async fn verify_password(password: String, stored: Option<String>) -> bool {
    tokio::task::spawn_blocking(move || {
        let known = stored.is_some();
        let text = stored.unwrap_or_else(|| DUMMY_HASH.to_string());
        let Ok(parsed) = PasswordHash::new(&text) else {
            return false;
        };
        argon2()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
            && known
    })
    .await
    .unwrap_or(false)
}

/// An RFC 6238 generator: SHA-1, 6 digits, 30-second steps, one step of skew either way (what every
/// authenticator app supports).
pub(crate) fn totp(secret_base32: &str) -> Option<Totp> {
    let secret = Secret::try_from_base32(secret_base32).ok()?;
    Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(6)
        .with_skew(1)
        .with_step_duration(30)
        .with_secret(secret)
        .build()
        .ok()
}

/// The TOTP secret offered to a session during set-up (160 bits, RFC 4226 §4), base32: derived
/// from the session's id hash (256 random bits, kept server-side), so reloading the set-up page
/// shows the key already scanned, and each session gets another.
pub(crate) fn setup_totp_secret(session_id_hash: &str) -> String {
    let d = Sha256::new()
        .chain_update(b"fhir-edge TOTP set-up\0")
        .chain_update(session_id_hash.as_bytes())
        .finalize();
    let mut key = [0u8; 20];
    key.copy_from_slice(&d[..20]);
    Secret::new_stack(key).to_base32()
}

/// The `otpauth://` URI authenticator apps import (Key Uri Format): label `issuer:email`.
pub(crate) fn otpauth_uri(secret_base32: &str, email: &str) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    let issuer = utf8_percent_encode(PRODUCT, NON_ALPHANUMERIC);
    let account = utf8_percent_encode(email, NON_ALPHANUMERIC);
    format!(
        "otpauth://totp/{issuer}:{account}?secret={secret_base32}&issuer={issuer}&algorithm=SHA1&digits=6&period=30"
    )
}

/// The time step a code is valid for at `now`, if it is.
pub(crate) fn check_totp(secret_base32: &str, code: &str, now: u64) -> Option<u64> {
    let code: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    totp(secret_base32)?.check(&code, now)
}

/// New recovery codes: what the owner is shown once, and what is stored (their hashes).
pub(crate) fn new_recovery_codes() -> Result<(Vec<String>, Vec<String>), String> {
    let mut shown = Vec::with_capacity(RECOVERY_CODES);
    for _ in 0..RECOVERY_CODES {
        // 50 bits in ten characters of an unambiguous alphabet, shown as two groups of five.
        const ALPHABET: &[u8] = b"23456789abcdefghjkmnpqrstuvwxyz";
        let bytes = random_bytes::<10>()?;
        let code: String = bytes
            .iter()
            .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
            .collect();
        shown.push(format!("{}-{}", &code[..5], &code[5..]));
    }
    let stored = shown.iter().map(|c| sha256_hex(c)).collect();
    Ok((shown, stored))
}

/// A recovery code as typed, in the form its hash was taken of.
pub(crate) fn normalise_recovery_code(code: &str) -> Option<String> {
    let plain: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (plain.len() == 10).then(|| format!("{}-{}", &plain[..5], &plain[5..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_with_the_email_or_product_name_or_too_short_are_refused() {
        let e = "owner@hospital.example";
        assert!(password_problem("short", e, 12).is_some());
        assert!(password_problem("my owner@hospital.example pw", e, 12).is_some());
        assert!(password_problem("xxOWNERxx-long-enough", e, 12).is_some());
        // A short name part is inside ordinary words: not refused.
        let short = "ann@hospital.example";
        assert!(password_problem("planning a channel cruise", short, 12).is_none());
        assert!(password_problem("ann@hospital.example!", short, 12).is_some());
        assert!(password_problem("Fhir_Edge is my password", e, 12).is_some());
        assert!(password_problem("aaaaaaaaaaaaaaaa", e, 12).is_some());
        assert!(password_problem("correct horse battery staple", e, 12).is_none());
    }

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() {
        let h = hash_password("correct horse battery staple".into())
            .await
            .unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_password("correct horse battery staple".into(), Some(h.clone())).await);
        assert!(!verify_password("correct horse battery stapler".into(), Some(h)).await);
        assert!(!verify_password("anything".into(), None).await);
    }

    #[test]
    fn the_dummy_hash_parses_so_unknown_accounts_cost_a_real_verification() {
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }

    #[test]
    fn totp_codes_match_rfc_6238_and_step_is_returned() {
        // RFC 6238 Appendix B: the SHA-1 seed "12345678901234567890", T = 59 s → 94287082 (8
        // digits); its last six digits are the 6-digit code.
        let seed = Secret::new_stack(*b"12345678901234567890").to_base32();
        assert_eq!(check_totp(&seed, "287082", 59), Some(1));
        assert_eq!(check_totp(&seed, "287 082", 59), Some(1));
        assert_eq!(check_totp(&seed, "287083", 59), None);
        assert_eq!(check_totp(&seed, "28708", 59), None);
    }

    #[test]
    fn recovery_codes_are_stored_as_hashes_and_typed_loosely() {
        let (shown, stored) = new_recovery_codes().unwrap();
        assert_eq!(shown.len(), RECOVERY_CODES);
        let typed = shown[3].to_uppercase().replace('-', " ");
        let n = normalise_recovery_code(&typed).unwrap();
        assert_eq!(sha256_hex(&n), stored[3]);
        assert!(!stored.contains(&shown[3]));
    }
}
