//! The CapabilityStatement fhir-edge serves at `{base}/metadata`, built from the upstream's: the
//! SMART `oauth-uris` security extension and the security service coding are added or replaced
//! (Teams EHR integration document; SMART App Launch), `implementation.url` points at the public
//! base, the known R4 slip of `profile` given as a Reference is repaired, and the required R4 shape
//! is checked (`status`, `date`, `kind`, `fhirVersion`, `format`, `rest[0].mode = server`, a
//! `Patient` resource). Pure functions over JSON; [`super::discovery`] fetches, caches and serves.

use serde_json::{json, Value};

use super::discovery::SecurityUris;

pub(crate) const OAUTH_URIS: &str =
    "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";
/// The system the Teams document shows for the security service coding.
pub(crate) const TEAMS_SERVICE_SYSTEM: &str =
    "http://hl7.org/fhir/ValueSet/restful-security-service";
/// The canonical code system of the same code.
pub(crate) const CANONICAL_SERVICE_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/restful-security-service";

/// The oauth-uris extension and the security service codings, as the Teams document shows them.
fn security_elements(s: &SecurityUris) -> (Value, Value) {
    let extension = json!({
        "url": OAUTH_URIS,
        "extension": [
            {"url": "token", "valueUri": s.token},
            {"url": "authorize", "valueUri": s.authorize},
            {"url": "register", "valueUri": s.register},
        ]
    });
    let service = json!([{
        "coding": [
            {"system": TEAMS_SERVICE_SYSTEM, "code": "OAuth"},
            {"system": CANONICAL_SERVICE_SYSTEM, "code": "OAuth", "display": "OAuth"},
        ],
        "text": "OAuth2 using the client-credentials grant",
    }]);
    (extension, service)
}

/// Adds or replaces the security elements, points `implementation.url` at the public base, repairs
/// what R4 clients choke on, and validates the result. `Err` lists what is wrong.
pub(crate) fn transform(
    mut st: Value,
    public_base: &str,
    security: Option<&SecurityUris>,
) -> Result<Value, Vec<String>> {
    let Some(obj) = st.as_object_mut() else {
        return Err(vec!["not a JSON object".into()]);
    };
    let r4 = obj
        .get("fhirVersion")
        .and_then(Value::as_str)
        .is_some_and(|v| v.starts_with("4."));
    if let Some(rest) = obj.get_mut("rest").and_then(Value::as_array_mut) {
        for entry in rest.iter_mut().filter_map(Value::as_object_mut) {
            if let Some(s) = security {
                let (extension, service) = security_elements(s);
                let sec = entry.entry("security").or_insert_with(|| json!({}));
                if !sec.is_object() {
                    *sec = json!({});
                }
                if let Some(sec) = sec.as_object_mut() {
                    let mut exts: Vec<Value> = sec
                        .get("extension")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter(|e| {
                                    e.get("url").and_then(Value::as_str) != Some(OAUTH_URIS)
                                })
                                .cloned()
                                .collect()
                        })
                        .unwrap_or_default();
                    exts.insert(0, extension);
                    sec.insert("extension".into(), Value::Array(exts));
                    sec.insert("service".into(), service);
                }
            }
            if r4 {
                repair_canonicals(entry);
            }
        }
    }
    let implementation = obj.entry("implementation").or_insert_with(|| json!({}));
    if let Some(imp) = implementation.as_object_mut() {
        imp.entry("description")
            .or_insert_with(|| json!("fhir-edge"));
        imp.insert("url".into(), json!(public_base));
    }
    let problems = validate(&st, r4);
    if problems.is_empty() {
        Ok(st)
    } else {
        Err(problems)
    }
}

/// R4 `CapabilityStatement.rest.resource.profile` is a canonical (a string); some servers emit the
/// STU3 Reference shape `{"reference": "…"}`, which strict R4 parsers reject. Take the reference.
fn repair_canonicals(rest: &mut serde_json::Map<String, Value>) {
    let Some(resources) = rest.get_mut("resource").and_then(Value::as_array_mut) else {
        return;
    };
    let fix = |v: &mut Value| {
        if let Some(r) = v
            .get("reference")
            .and_then(Value::as_str)
            .map(str::to_string)
        {
            *v = Value::String(r);
        }
    };
    for r in resources.iter_mut().filter_map(Value::as_object_mut) {
        if let Some(p) = r.get_mut("profile") {
            fix(p);
        }
        if let Some(list) = r.get_mut("supportedProfile").and_then(Value::as_array_mut) {
            list.iter_mut().for_each(fix);
        }
    }
}

/// The shape strict clients (Python fhirclient's R4 models) require, plus what the Teams flow needs.
fn validate(st: &Value, r4: bool) -> Vec<String> {
    let mut p = Vec::new();
    let rt = st.get("resourceType").and_then(Value::as_str);
    if !matches!(rt, Some("CapabilityStatement") | Some("Conformance")) {
        p.push("resourceType is not CapabilityStatement".into());
    }
    for field in ["status", "date", "kind", "fhirVersion"] {
        if !st.get(field).is_some_and(Value::is_string) {
            p.push(format!("{field} is missing or not a string"));
        }
    }
    let formats_ok = st
        .get("format")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty() && f.iter().all(Value::is_string));
    if !formats_ok {
        p.push("format is missing or not a list of strings".into());
    }
    let rest0 = st
        .get("rest")
        .and_then(Value::as_array)
        .and_then(|r| r.first());
    match rest0 {
        None => p.push("rest is missing".into()),
        Some(r) => {
            if r.get("mode").and_then(Value::as_str) != Some("server") {
                p.push("rest[0].mode is not server".into());
            }
            let has_patient = r
                .get("resource")
                .and_then(Value::as_array)
                .is_some_and(|rs| {
                    rs.iter()
                        .any(|x| x.get("type").and_then(Value::as_str) == Some("Patient"))
                });
            if !has_patient {
                p.push("rest[0].resource does not list Patient".into());
            }
        }
    }
    if r4 {
        for (i, r) in st
            .get("rest")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|r| r.get("resource").and_then(Value::as_array))
            .flatten()
            .enumerate()
        {
            if r.get("profile").is_some_and(|v| !v.is_string()) {
                p.push(format!(
                    "rest.resource[{i}].profile is not a canonical string"
                ));
            }
            let bad_supported = r
                .get("supportedProfile")
                .is_some_and(|v| !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)));
            if bad_supported {
                p.push(format!(
                    "rest.resource[{i}].supportedProfile is not a list of canonical strings"
                ));
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::discovery::SecurityUris;

    fn uris() -> SecurityUris {
        SecurityUris {
            token: "https://edge.example/fhir/token".into(),
            authorize: "https://edge.example/fhir/authorize".into(),
            register: "https://edge.example/fhir/register".into(),
            jwks: "https://edge.example/fhir/.well-known/jwks.json".into(),
            issuer: "https://edge.example/fhir".into(),
        }
    }

    fn upstream_statement() -> Value {
        json!({
            "resourceType": "CapabilityStatement",
            "status": "active", "date": "2026-01-01", "kind": "instance", "fhirVersion": "4.0.1",
            "format": ["application/fhir+json"],
            "implementation": {"description": "Hospital FHIR", "url": "http://10.0.0.5:8090/fhir"},
            "rest": [{
                "mode": "server",
                "security": {"cors": true, "extension": [
                    {"url": OAUTH_URIS, "extension": [{"url": "token", "valueUri": "http://10.0.0.5:8090/auth/token"}]},
                    {"url": "http://example.org/other", "valueString": "kept"}
                ], "service": [{"coding": [{"code": "SMART-on-FHIR"}]}]},
                "resource": [{"type": "Patient", "profile": {"reference": "http://hl7.org/fhir/StructureDefinition/Patient"}}]
            }]
        })
    }

    #[test]
    fn security_is_replaced_and_everything_else_kept() {
        let out = transform(
            upstream_statement(),
            "https://edge.example/fhir",
            Some(&uris()),
        )
        .unwrap();
        let sec = &out["rest"][0]["security"];
        assert_eq!(sec["cors"], true);
        assert_eq!(
            sec["service"][0]["coding"][0],
            json!({"system": TEAMS_SERVICE_SYSTEM, "code": "OAuth"})
        );
        assert_eq!(
            sec["service"][0]["coding"][1]["system"],
            CANONICAL_SERVICE_SYSTEM
        );
        let exts = sec["extension"].as_array().unwrap();
        assert_eq!(
            exts.len(),
            2,
            "the upstream's oauth-uris is replaced, other extensions kept"
        );
        assert_eq!(exts[0]["url"], OAUTH_URIS);
        assert_eq!(
            exts[0]["extension"][0],
            json!({"url": "token", "valueUri": "https://edge.example/fhir/token"})
        );
        assert_eq!(exts[0]["extension"][1]["url"], "authorize");
        assert_eq!(exts[0]["extension"][2]["url"], "register");
        assert_eq!(exts[1]["valueString"], "kept");
        assert_eq!(out["implementation"]["url"], "https://edge.example/fhir");
        assert_eq!(out["implementation"]["description"], "Hospital FHIR");
        assert_eq!(
            out["rest"][0]["resource"][0]["profile"],
            "http://hl7.org/fhir/StructureDefinition/Patient",
            "the STU3 Reference shape is repaired to an R4 canonical"
        );
    }

    #[test]
    fn a_statement_missing_required_elements_is_refused() {
        let mut st = upstream_statement();
        st.as_object_mut().unwrap().remove("kind");
        st["rest"][0]["resource"] = json!([{"type": "Observation"}]);
        let problems = transform(st, "https://edge.example/fhir", Some(&uris())).unwrap_err();
        assert!(problems.iter().any(|p| p.contains("kind")));
        assert!(problems.iter().any(|p| p.contains("Patient")));
        assert!(transform(json!({"resourceType": "Bundle"}), "x", None).is_err());
        assert!(transform(json!([1]), "x", None).is_err());
    }
}
