//! A token's header and claims, read once and strictly.
//!
//! Both parts are JSON objects read by serde_json through one bounded reader that refuses a member
//! given twice (at any depth) and nesting deeper than [`MAX_DEPTH`]; the size is already bounded by
//! the bearer extractor. Then every registered claim is held to its JSON type (RFC 7519 §4.1,
//! RFC 9068 §2.2): `iss`, `sub`, `jti`, `client_id` and `scope` are strings, `aud` a string or an array
//! of strings, `scp` an array of strings or a string, `exp`/`nbf`/`iat` numbers. A present claim of
//! another type (`null` included) is refused, and so is a token carrying both `scope` and `scp`:
//! whichever the router read, the verifier must have read the same thing. The header's `crit` is
//! refused whatever it lists: fhir-edge understands no JWS extension.

use jsonwebtoken::Algorithm;
use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::AuthFailure;

/// The deepest nesting of objects and arrays a header or claims object may have (the object itself
/// is level 1).
pub(crate) const MAX_DEPTH: usize = 8;

/// Reads one JSON object: no member twice at any level, at most `depth` levels, nothing after it.
pub(crate) fn strict_object(bytes: &[u8], depth: usize) -> Result<Map<String, Value>, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict(depth)
        .deserialize(&mut de)
        .map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    match value {
        Value::Object(m) => Ok(m),
        _ => Err("not a JSON object".into()),
    }
}

/// A serde seed building a [`Value`] with the remaining depth it may use.
struct Strict(usize);

impl Strict {
    fn inner<E: serde::de::Error>(&self) -> Result<Strict, E> {
        self.0
            .checked_sub(1)
            .filter(|d| *d > 0)
            .map(Strict)
            .ok_or_else(|| E::custom("nested too deeply"))
    }
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("not a finite number"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self.inner()?)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(A::Error::custom("a member is given twice"));
            }
            let v = map.next_value_seed(self.inner()?)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// The header members fhir-edge uses.
#[derive(Debug)]
pub(crate) struct Header {
    pub alg: Algorithm,
    pub kid: Option<String>,
}

/// The parts of a compact JWS: header and payload JSON (decoded), the signed text, the signature
/// (still base64url).
pub(crate) struct Parts<'t> {
    pub header: Header,
    pub claims: Claims,
    pub signed: &'t str,
    pub signature: &'t str,
}

/// Splits and reads a compact JWS. Exactly three segments: five are a JWE, four or six are garbage.
pub(crate) fn read(token: &str) -> Result<Parts<'_>, AuthFailure> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (signed, signature) = token.rsplit_once('.').ok_or(AuthFailure::Malformed401)?;
    let (header, payload) = signed.split_once('.').ok_or(AuthFailure::Malformed401)?;
    if payload.contains('.') || signature.is_empty() {
        return Err(AuthFailure::Malformed401);
    }
    let header = b64.decode(header).map_err(|_| AuthFailure::Malformed401)?;
    let header = read_header(&header)?;
    let payload = b64.decode(payload).map_err(|_| AuthFailure::Malformed401)?;
    let members = strict_object(&payload, MAX_DEPTH).map_err(|_| AuthFailure::Malformed401)?;
    Ok(Parts {
        header,
        claims: Claims::from_members(members)?,
        signed,
        signature,
    })
}

fn read_header(bytes: &[u8]) -> Result<Header, AuthFailure> {
    let m = strict_object(bytes, MAX_DEPTH).map_err(|_| AuthFailure::Malformed401)?;
    if m.contains_key("crit") {
        return Err(AuthFailure::Malformed401);
    }
    // RFC 9068 §2.1 asks for `at+jwt`; plain `JWT` is what most issuers still send (RFC 8725 §3.11).
    match m.get("typ").and_then(Value::as_str) {
        Some(t)
            if t.eq_ignore_ascii_case("at+jwt")
                || t.eq_ignore_ascii_case("application/at+jwt")
                || t.eq_ignore_ascii_case("JWT") => {}
        _ => return Err(AuthFailure::WrongType),
    }
    // `none` and anything unknown do not parse.
    let alg = m
        .get("alg")
        .and_then(Value::as_str)
        .and_then(|a| a.parse::<Algorithm>().ok())
        .ok_or(AuthFailure::Malformed401)?;
    let kid = match m.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(AuthFailure::Malformed401),
    };
    // `jku`, `x5u`, `jwk` and `x5c` are never read: keys come from configuration only.
    Ok(Header { alg, kid })
}

/// `aud` (RFC 7519 §4.1.3): one string or an array of strings.
#[derive(Debug)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub(crate) fn contains(&self, aud: &str) -> bool {
        match self {
            Audience::One(a) => a == aud,
            Audience::Many(v) => v.iter().any(|a| a == aud),
        }
    }
}

/// The claims fhir-edge reads, each of its type; the rest stay in `others` (a tenant claim is
/// read from there).
#[derive(Debug, Default)]
pub struct Claims {
    pub iss: Option<String>,
    pub aud: Option<Audience>,
    /// `scope` (a space-separated string).
    pub scope: Option<String>,
    /// `scp` (a list, or a space-separated string), joined with spaces.
    pub scp: Option<String>,
    pub sub: Option<String>,
    pub client_id: Option<String>,
    pub jti: Option<String>,
    /// Which client secret authenticated the token request (tokens of fhir-edge's own issuer).
    pub secret_id: Option<String>,
    pub exp: Option<f64>,
    pub nbf: Option<f64>,
    pub iat: Option<f64>,
    pub others: Map<String, Value>,
}

impl Claims {
    pub(crate) fn from_members(mut m: Map<String, Value>) -> Result<Claims, AuthFailure> {
        let mut take = |name: &str| m.remove(name);
        let c = Claims {
            iss: string(take("iss"))?,
            aud: match take("aud") {
                None => None,
                Some(Value::String(s)) => Some(Audience::One(s)),
                Some(v @ Value::Array(_)) => Some(Audience::Many(strings(v)?)),
                Some(_) => return Err(AuthFailure::Malformed401),
            },
            scope: string(take("scope"))?,
            scp: match take("scp") {
                None => None,
                Some(Value::String(s)) => Some(s),
                Some(v @ Value::Array(_)) => Some(strings(v)?.join(" ")),
                Some(_) => return Err(AuthFailure::Malformed401),
            },
            sub: string(take("sub"))?,
            client_id: string(take("client_id"))?,
            jti: string(take("jti"))?,
            secret_id: string(take("secret_id"))?,
            exp: number(take("exp"))?,
            nbf: number(take("nbf"))?,
            iat: number(take("iat"))?,
            others: Map::new(),
        };
        if c.scope.is_some() && c.scp.is_some() {
            return Err(AuthFailure::Malformed401);
        }
        Ok(Claims { others: m, ..c })
    }
}

impl Claims {
    /// The client the token was issued to: RFC 9068's `client_id`, else OpenID Connect's `azp`
    /// (Entra ID v2 access tokens, Keycloak, Okta), else Entra ID v1's `appid`. Never `sub`: an
    /// external issuer's `sub` may name a person. Read for the audit log and per-client limits.
    pub(crate) fn client(&self) -> Option<String> {
        let other = |name: &str| self.others.get(name).and_then(Value::as_str);
        self.client_id
            .clone()
            .or_else(|| other("azp").or_else(|| other("appid")).map(str::to_string))
    }
}

fn string(v: Option<Value>) -> Result<Option<String>, AuthFailure> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(AuthFailure::Malformed401),
    }
}

fn number(v: Option<Value>) -> Result<Option<f64>, AuthFailure> {
    match v {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or(AuthFailure::Malformed401),
        Some(_) => Err(AuthFailure::Malformed401),
    }
}

fn strings(v: Value) -> Result<Vec<String>, AuthFailure> {
    match v {
        Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Value::String(s) => Ok(s),
                _ => Err(AuthFailure::Malformed401),
            })
            .collect(),
        _ => Err(AuthFailure::Malformed401),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_client_id_then_azp_then_appid_and_never_sub() {
        let client = |v: serde_json::Value| {
            let Value::Object(m) = v else { unreachable!() };
            Claims::from_members(m).unwrap().client()
        };
        let all = serde_json::json!({"client_id": "c", "azp": "a", "appid": "p", "sub": "s"});
        assert_eq!(client(all).as_deref(), Some("c"));
        let entra_v2 = serde_json::json!({"azp": "a", "appid": "p", "sub": "s"});
        assert_eq!(client(entra_v2).as_deref(), Some("a"));
        assert_eq!(
            client(serde_json::json!({"appid": "p"})).as_deref(),
            Some("p")
        );
        assert_eq!(client(serde_json::json!({"sub": "s"})), None);
        assert_eq!(client(serde_json::json!({"azp": 7})), None, "not a string");
    }

    #[test]
    fn a_member_given_twice_is_refused_at_any_depth() {
        assert!(strict_object(br#"{"a":1,"b":2}"#, MAX_DEPTH).is_ok());
        assert!(strict_object(br#"{"a":1,"a":1}"#, MAX_DEPTH).is_err());
        assert!(strict_object(br#"{"x":{"a":1,"a":2}}"#, MAX_DEPTH).is_err());
        assert!(strict_object(br#"{"x":[{"a":1,"a":2}]}"#, MAX_DEPTH).is_err());
    }

    #[test]
    fn nesting_is_bounded() {
        let ok = format!("{}1{}", r#"{"a":"#.repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
        assert!(strict_object(ok.as_bytes(), MAX_DEPTH + 1).is_ok());
        assert!(strict_object(ok.as_bytes(), MAX_DEPTH).is_err());
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert!(strict_object(deep.as_bytes(), MAX_DEPTH).is_err());
        assert!(strict_object(b"[1]", MAX_DEPTH).is_err(), "not an object");
        assert!(strict_object(b"{} {}", MAX_DEPTH).is_err(), "trailing data");
    }

    fn claims(json: &str) -> Result<Claims, AuthFailure> {
        Claims::from_members(strict_object(json.as_bytes(), MAX_DEPTH).unwrap())
    }

    #[test]
    fn claims_are_typed_and_scope_with_scp_is_refused() {
        let c =
            claims(r#"{"iss":"i","aud":["a","b"],"scp":["x","y"],"exp":1.5,"tid":"t"}"#).unwrap();
        assert_eq!(c.scp.as_deref(), Some("x y"));
        assert!(c.aud.as_ref().is_some_and(|a| a.contains("b")));
        assert_eq!(c.others.get("tid").and_then(Value::as_str), Some("t"));
        for bad in [
            r#"{"iss":["i"]}"#,
            r#"{"iss":null}"#,
            r#"{"exp":"1"}"#,
            r#"{"aud":[1]}"#,
            r#"{"scp":[1]}"#,
            r#"{"scope":"a","scp":["b"]}"#,
        ] {
            assert_eq!(claims(bad).err(), Some(AuthFailure::Malformed401), "{bad}");
        }
    }

    #[test]
    fn a_crit_header_is_refused_and_typ_is_required() {
        assert!(read_header(br#"{"alg":"RS256","typ":"at+jwt","kid":"k"}"#).is_ok());
        assert_eq!(
            read_header(br#"{"alg":"RS256","typ":"JWT","crit":["exp"],"exp":1}"#).err(),
            Some(AuthFailure::Malformed401)
        );
        assert_eq!(
            read_header(br#"{"alg":"RS256"}"#).err(),
            Some(AuthFailure::WrongType)
        );
        assert_eq!(
            read_header(br#"{"alg":"none","typ":"JWT"}"#).err(),
            Some(AuthFailure::Malformed401)
        );
        assert_eq!(
            read_header(br#"{"alg":"RS256","typ":"JWT","alg":"HS256"}"#).err(),
            Some(AuthFailure::Malformed401)
        );
    }
}
