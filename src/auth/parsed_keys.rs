//! jsonwebtoken's aws-lc-rs crypto provider, with RSA and ECDSA keys parsed once instead of on every
//! token.
//!
//! jsonwebtoken 12's aws-lc-rs verifiers hand the key's bytes to aws-lc-rs's one-shot
//! `UnparsedPublicKey::verify`, which parses them into an `EVP_PKEY` on every call: for RSA that
//! includes the Montgomery set-up of the modulus, about a third of an RS256 verification. Its signers
//! parse the private key on every token too (for RSA with the full key check). This provider is
//! jsonwebtoken's own aws-lc-rs provider with one change: RSA (RS*, PS*) and ECDSA (ES256, ES384)
//! keys are parsed on first use by each thread and kept, and the same aws-lc-rs algorithms verify and
//! sign with them (an RSA public key given as modulus and exponent, as JWKs give it, is parsed from
//! the PKCS#1 DER of the two). HMAC and EdDSA keys, and keys that do not parse, go to jsonwebtoken's
//! provider unchanged (which reports their errors as before).
//! jsonwebtoken still does everything else: the header, `alg` pinning, base64 and claims validation.
//!
//! The cache is per thread, bounded, and keyed by the key itself: a public key by its bytes, a private
//! key by its SHA-256 digest (so no second copy of it is kept). Keys only ever come from fhir-edge's
//! configuration, never from a token.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use aws_lc_rs::digest::{digest, SHA256};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, EcdsaSigningAlgorithm, ParsedPublicKey, RsaEncoding, RsaKeyPair,
    VerificationAlgorithm, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING,
    ECDSA_P384_SHA384_FIXED, ECDSA_P384_SHA384_FIXED_SIGNING, RSA_PKCS1_2048_8192_SHA256,
    RSA_PKCS1_2048_8192_SHA384, RSA_PKCS1_2048_8192_SHA512, RSA_PKCS1_SHA256, RSA_PKCS1_SHA384,
    RSA_PKCS1_SHA512, RSA_PSS_2048_8192_SHA256, RSA_PSS_2048_8192_SHA384, RSA_PSS_2048_8192_SHA512,
    RSA_PSS_SHA256, RSA_PSS_SHA384, RSA_PSS_SHA512,
};
use jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER;
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier};
use jsonwebtoken::errors::Error;
use jsonwebtoken::signature;
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey};

/// Parsed keys kept per thread, per kind. A deployment has a handful of keys; the bound only guards
/// against a process that keeps building new ones (tests, key rotations).
const PER_THREAD: usize = 16;

static PROVIDER: OnceLock<CryptoProvider> = OnceLock::new();

fn provider() -> &'static CryptoProvider {
    PROVIDER.get_or_init(|| CryptoProvider {
        signer_factory: new_signer,
        verifier_factory: new_verifier,
        key_utils: DEFAULT_PROVIDER.key_utils.clone(),
    })
}

/// Makes this provider jsonwebtoken's process-wide one. It has to run before anything else in the
/// process uses jsonwebtoken (which otherwise settles on its own provider for good); `main` calls it
/// first. Returns whether this provider is the one in use.
pub(crate) fn install() -> bool {
    let ours = provider();
    match CryptoProvider::install_default(ours) {
        Ok(()) => true,
        Err(current) => std::ptr::eq(current, ours),
    }
}

fn verification_alg(alg: Algorithm) -> Option<&'static dyn VerificationAlgorithm> {
    Some(match alg {
        Algorithm::RS256 => &RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &RSA_PSS_2048_8192_SHA512,
        Algorithm::ES256 => &ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &ECDSA_P384_SHA384_FIXED,
        _ => return None,
    })
}

enum SigningAlg {
    Rsa(&'static dyn RsaEncoding),
    Ecdsa(&'static EcdsaSigningAlgorithm),
}

fn signing_alg(alg: Algorithm) -> Option<SigningAlg> {
    Some(match alg {
        Algorithm::RS256 => SigningAlg::Rsa(&RSA_PKCS1_SHA256),
        Algorithm::RS384 => SigningAlg::Rsa(&RSA_PKCS1_SHA384),
        Algorithm::RS512 => SigningAlg::Rsa(&RSA_PKCS1_SHA512),
        Algorithm::PS256 => SigningAlg::Rsa(&RSA_PSS_SHA256),
        Algorithm::PS384 => SigningAlg::Rsa(&RSA_PSS_SHA384),
        Algorithm::PS512 => SigningAlg::Rsa(&RSA_PSS_SHA512),
        Algorithm::ES256 => SigningAlg::Ecdsa(&ECDSA_P256_SHA256_FIXED_SIGNING),
        Algorithm::ES384 => SigningAlg::Ecdsa(&ECDSA_P384_SHA384_FIXED_SIGNING),
        _ => return None,
    })
}

/// A small FIFO map: lookups are a scan of at most [`PER_THREAD`] entries.
struct Recent<K, V>(Vec<(K, V)>);

impl<K, V: Clone> Recent<K, V> {
    const fn new() -> Self {
        Recent(Vec::new())
    }

    /// The value of the entry whose key `is`; else `make`s one and keeps it under `key()`.
    fn get_or_try_insert(
        &mut self,
        is: impl Fn(&K) -> bool,
        key: impl FnOnce() -> K,
        make: impl FnOnce() -> Option<V>,
    ) -> Option<V> {
        if let Some((_, v)) = self.0.iter().find(|(k, _)| is(k)) {
            return Some(v.clone());
        }
        let v = make()?;
        if self.0.len() >= PER_THREAD {
            self.0.remove(0);
        }
        self.0.push((key(), v.clone()));
        Some(v)
    }
}

/// A public key as jsonwebtoken holds it. The two forms never compare equal to each other.
enum PublicForm {
    Der(Box<[u8]>),
    Components(Box<[u8]>, Box<[u8]>),
}

impl PublicForm {
    fn of(kind: &DecodingKeyKind) -> PublicForm {
        match kind {
            DecodingKeyKind::SecretOrDer(der) => PublicForm::Der(der.as_slice().into()),
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                PublicForm::Components(n.as_slice().into(), e.as_slice().into())
            }
        }
    }

    fn is(&self, kind: &DecodingKeyKind) -> bool {
        match (self, kind) {
            (PublicForm::Der(a), DecodingKeyKind::SecretOrDer(b)) => a[..] == b[..],
            (
                PublicForm::Components(n, e),
                DecodingKeyKind::RsaModulusExponent { n: n2, e: e2 },
            ) => n[..] == n2[..] && e[..] == e2[..],
            _ => false,
        }
    }
}

type PublicKeys = Recent<(Algorithm, PublicForm), Arc<ParsedPublicKey>>;

enum KeyPair {
    Rsa(&'static dyn RsaEncoding, Arc<RsaKeyPair>),
    Ecdsa(Arc<EcdsaKeyPair>),
}

impl Clone for KeyPair {
    fn clone(&self) -> Self {
        match self {
            KeyPair::Rsa(enc, k) => KeyPair::Rsa(*enc, Arc::clone(k)),
            KeyPair::Ecdsa(k) => KeyPair::Ecdsa(Arc::clone(k)),
        }
    }
}

type PrivateKeys = Recent<(Algorithm, [u8; 32]), KeyPair>;

thread_local! {
    static PUBLIC: RefCell<PublicKeys> = const { RefCell::new(Recent::new()) };
    static PRIVATE: RefCell<PrivateKeys> = const { RefCell::new(Recent::new()) };
}

/// The parsed form of `key` for `alg`, if this provider handles the pair.
fn parsed_public(alg: Algorithm, key: &DecodingKey) -> Option<Arc<ParsedPublicKey>> {
    let verification = verification_alg(alg)?;
    if key.family() != alg.family() {
        return None;
    }
    let kind = key.kind();
    PUBLIC.with(|cache| {
        cache.borrow_mut().get_or_try_insert(
            |(a, form)| *a == alg && form.is(kind),
            || (alg, PublicForm::of(kind)),
            || {
                let parsed = match kind {
                    DecodingKeyKind::SecretOrDer(der) => ParsedPublicKey::new(verification, der),
                    // A JWK's modulus and exponent (and fhir-edge's own RSA signing keys): as PKCS#1
                    // DER, which aws-lc-rs parses for RSA algorithms.
                    DecodingKeyKind::RsaModulusExponent { n, e } => {
                        ParsedPublicKey::new(verification, rsa_public_der(n, e)?)
                    }
                };
                parsed.ok().map(Arc::new)
            },
        )
    })
}

/// PKCS#1 `RSAPublicKey` DER for a big-endian modulus and exponent.
fn rsa_public_der(n: &[u8], e: &[u8]) -> Option<Vec<u8>> {
    use rsa::pkcs1::der::Encode as _;
    rsa::pkcs1::RsaPublicKeyRef {
        modulus: rsa::pkcs1::UintRef::new(n).ok()?,
        public_exponent: rsa::pkcs1::UintRef::new(e).ok()?,
    }
    .to_der()
    .ok()
}

fn parsed_private(alg: Algorithm, key: &EncodingKey) -> Option<KeyPair> {
    let signing = signing_alg(alg)?;
    if key.family() != alg.family() {
        return None;
    }
    let bytes = key.as_bytes();
    let mut id = [0u8; 32];
    id.copy_from_slice(digest(&SHA256, bytes).as_ref());
    PRIVATE.with(|cache| {
        cache.borrow_mut().get_or_try_insert(
            |k| *k == (alg, id),
            || (alg, id),
            || match signing {
                SigningAlg::Rsa(enc) => RsaKeyPair::from_der(bytes)
                    .ok()
                    .map(|k| KeyPair::Rsa(enc, Arc::new(k))),
                SigningAlg::Ecdsa(a) => EcdsaKeyPair::from_pkcs8(a, bytes)
                    .ok()
                    .map(|k| KeyPair::Ecdsa(Arc::new(k))),
            },
        )
    })
}

struct ParsedVerifier {
    alg: Algorithm,
    key: Arc<ParsedPublicKey>,
}

impl signature::Verifier<Vec<u8>> for ParsedVerifier {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        self.key
            .verify_sig(msg, sig)
            .map_err(signature::Error::from_source)
    }
}

impl JwtVerifier for ParsedVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

struct ParsedSigner {
    alg: Algorithm,
    key: KeyPair,
}

impl signature::Signer<Vec<u8>> for ParsedSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let rng = SystemRandom::new();
        match &self.key {
            KeyPair::Rsa(enc, k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(*enc, &rng, msg, &mut sig)
                    .map_err(signature::Error::from_source)?;
                Ok(sig)
            }
            KeyPair::Ecdsa(k) => k
                .sign(&rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(signature::Error::from_source),
        }
    }
}

impl JwtSigner for ParsedSigner {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    match parsed_public(*alg, key) {
        Some(key) => Ok(Box::new(ParsedVerifier { alg: *alg, key })),
        None => (DEFAULT_PROVIDER.verifier_factory)(alg, key),
    }
}

fn new_signer(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    match parsed_private(*alg, key) {
        Some(key) => Ok(Box::new(ParsedSigner { alg: *alg, key })),
        None => (DEFAULT_PROVIDER.signer_factory)(alg, key),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! Differential: everything this provider signs or verifies must come out as with jsonwebtoken's
    //! own aws-lc-rs provider, for good signatures and bad ones.
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/keys")
                .join(name),
        )
        .unwrap()
    }

    fn theirs_verify(alg: Algorithm, key: &DecodingKey, msg: &[u8], sig: &[u8]) -> bool {
        (DEFAULT_PROVIDER.verifier_factory)(&alg, key)
            .unwrap()
            .verify(msg, &sig.to_vec())
            .is_ok()
    }

    fn ours_verify(alg: Algorithm, key: &DecodingKey, msg: &[u8], sig: &[u8]) -> bool {
        new_verifier(&alg, key)
            .unwrap()
            .verify(msg, &sig.to_vec())
            .is_ok()
    }

    fn rsa_pair(private: &str, public: &str) -> (EncodingKey, DecodingKey) {
        (
            EncodingKey::from_rsa_pem(&fixture(private)).unwrap(),
            DecodingKey::from_rsa_pem(&fixture(public)).unwrap(),
        )
    }

    fn new_es256_key() -> (EncodingKey, DecodingKey) {
        use p256::pkcs8::{EncodePrivateKey as _, LineEnding};
        let secret = loop {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).unwrap();
            if let Ok(k) = p256::SecretKey::from_slice(&bytes) {
                break k;
            }
        };
        let pem = secret.to_pkcs8_pem(LineEnding::LF).unwrap();
        let key = crate::token::keys::SigningKey::from_pem(&pem).unwrap();
        (key.encoding, key.decoding)
    }

    #[test]
    fn signatures_and_verdicts_match_jsonwebtokens_provider() {
        let (rs_enc, rs_dec) = rsa_pair("rs256.pem", "rs256.pub.pem");
        // Another RSA key, as modulus and exponent (the form JWKs and fhir-edge's own keys take).
        let other = crate::token::keys::SigningKey::from_pem(
            std::str::from_utf8(&fixture("other-rs256.pem")).unwrap(),
        )
        .unwrap();
        let other_rs_dec = other.decoding;
        // The same public key as `rs_dec`, as modulus and exponent.
        let rs_components = {
            let (n, e) = (DEFAULT_PROVIDER
                .key_utils
                .rsa_pub_components_from_private_key)(rs_enc.as_bytes())
            .unwrap();
            DecodingKey::from_rsa_raw_components(&n, &e)
        };
        let es_enc = EncodingKey::from_ec_pem(&fixture("es256.pem")).unwrap();
        let es_dec = DecodingKey::from_ec_pem(&fixture("es256.pub.pem")).unwrap();
        let cases: Vec<(Algorithm, &EncodingKey, &DecodingKey)> = vec![
            (Algorithm::RS256, &rs_enc, &rs_dec),
            (Algorithm::RS384, &rs_enc, &rs_dec),
            (Algorithm::RS512, &rs_enc, &rs_dec),
            (Algorithm::PS256, &rs_enc, &rs_dec),
            (Algorithm::PS512, &rs_enc, &rs_dec),
            (Algorithm::RS256, &rs_enc, &rs_components),
            (Algorithm::PS256, &rs_enc, &rs_components),
            (Algorithm::ES256, &es_enc, &es_dec),
        ];
        let msg = b"eyJhbGciOiJSUzI1NiJ9.eyJzY29wZSI6InN5c3RlbS8qLnJlYWQifQ";
        for (alg, enc, dec) in cases {
            let ours = new_signer(&alg, enc).unwrap().try_sign(msg).unwrap();
            let theirs = (DEFAULT_PROVIDER.signer_factory)(&alg, enc)
                .unwrap()
                .try_sign(msg)
                .unwrap();
            if matches!(alg, Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512) {
                // PKCS#1 v1.5 is deterministic: the very same bytes.
                assert_eq!(ours, theirs, "{alg:?}");
            }
            for sig in [&ours, &theirs] {
                assert!(ours_verify(alg, dec, msg, sig), "{alg:?}");
                assert!(theirs_verify(alg, dec, msg, sig), "{alg:?}");
                let mut tampered = msg.to_vec();
                tampered[3] ^= 1;
                let mut flipped = sig.clone();
                flipped[10] ^= 0x40;
                let truncated = &sig[..sig.len() - 1];
                for (m, s) in [
                    (&tampered[..], &sig[..]),
                    (&msg[..], &flipped[..]),
                    (&msg[..], truncated),
                    (&msg[..], &[][..]),
                ] {
                    assert!(!ours_verify(alg, dec, m, s), "{alg:?}");
                    assert!(!theirs_verify(alg, dec, m, s), "{alg:?}");
                }
            }
            // The right signature under another key of the same family.
            if dec.family() == jsonwebtoken::AlgorithmFamily::Rsa {
                assert!(!ours_verify(alg, &other_rs_dec, msg, &ours), "{alg:?}");
                assert!(!theirs_verify(alg, &other_rs_dec, msg, &ours), "{alg:?}");
            }
        }
    }

    #[test]
    fn keys_of_the_wrong_family_are_refused_as_before() {
        let (rs_enc, rs_dec) = rsa_pair("rs256.pem", "rs256.pub.pem");
        let es_enc = EncodingKey::from_ec_pem(&fixture("es256.pem")).unwrap();
        let es_dec = DecodingKey::from_ec_pem(&fixture("es256.pub.pem")).unwrap();
        for (alg, dec) in [(Algorithm::ES256, &rs_dec), (Algorithm::RS256, &es_dec)] {
            assert_same_refusal(
                new_verifier(&alg, dec),
                (DEFAULT_PROVIDER.verifier_factory)(&alg, dec),
            );
        }
        for (alg, enc) in [(Algorithm::ES256, &rs_enc), (Algorithm::PS256, &es_enc)] {
            assert_same_refusal(
                new_signer(&alg, enc),
                (DEFAULT_PROVIDER.signer_factory)(&alg, enc),
            );
        }
    }

    /// Both refused, with the same error kind.
    fn assert_same_refusal<T>(ours: Result<T, Error>, theirs: Result<T, Error>) {
        let kind = |r: Result<T, Error>| r.err().map(|e| format!("{:?}", e.kind()));
        let (ours, theirs) = (kind(ours), kind(theirs));
        assert!(ours.is_some());
        assert_eq!(ours, theirs);
    }

    #[test]
    fn a_key_is_parsed_once_per_thread_and_the_cache_stays_bounded() {
        let (rs_enc, rs_dec) = rsa_pair("rs256.pem", "rs256.pub.pem");
        let a = parsed_public(Algorithm::RS256, &rs_dec).unwrap();
        let b = parsed_public(Algorithm::RS256, &rs_dec).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        // The same bytes under another algorithm are another entry.
        let c = parsed_public(Algorithm::PS256, &rs_dec).unwrap();
        // An RSA key as modulus and exponent (a JWK, or fhir-edge's own RS256 signing key) is parsed
        // too, as another entry than the same key in DER.
        let own = crate::token::keys::SigningKey::from_pem(
            std::str::from_utf8(&fixture("rs256.pem")).unwrap(),
        )
        .unwrap();
        let from_components = parsed_public(Algorithm::RS256, &own.decoding).unwrap();
        assert!(!Arc::ptr_eq(&a, &from_components));
        assert!(!Arc::ptr_eq(&a, &c));
        let KeyPair::Rsa(_, p) = parsed_private(Algorithm::RS256, &rs_enc).unwrap() else {
            panic!("an RSA key pair")
        };
        let KeyPair::Rsa(_, q) = parsed_private(Algorithm::RS256, &rs_enc).unwrap() else {
            panic!("an RSA key pair")
        };
        assert!(Arc::ptr_eq(&p, &q));

        // More distinct keys than the bound: each still verifies, and the cache does not grow past it.
        let msg = b"header.payload";
        for _ in 0..PER_THREAD + 4 {
            let (enc, dec) = new_es256_key();
            // fhir-edge's own keys (built from the public point) take the parsed path too.
            assert!(parsed_public(Algorithm::ES256, &dec).is_some());
            assert!(parsed_private(Algorithm::ES256, &enc).is_some());
            let sig = new_signer(&Algorithm::ES256, &enc)
                .unwrap()
                .try_sign(msg)
                .unwrap();
            assert!(ours_verify(Algorithm::ES256, &dec, msg, &sig));
            assert!(theirs_verify(Algorithm::ES256, &dec, msg, &sig));
        }
        PUBLIC.with(|c| assert!(c.borrow().0.len() <= PER_THREAD));
        PRIVATE.with(|c| assert!(c.borrow().0.len() <= PER_THREAD));
        // The first key was evicted and comes back parsed anew, and still verifies.
        let d = parsed_public(Algorithm::RS256, &rs_dec).unwrap();
        assert!(!Arc::ptr_eq(&a, &d));
    }
}
