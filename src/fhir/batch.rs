//! `POST {base}` on a read-only route: the body must be a `batch` Bundle whose entries only read.
//!
//! The Patients app sends batch Bundles of searches (Teams EHR integration document). A `transaction`,
//! or a batch with a `PUT`/`POST`/`PATCH`/`DELETE` entry, is a write and is refused unless the tenant's
//! route allows writes. The body is buffered (bounded by `limits.max_body_bytes`) and released upstream
//! only after this check passes; a refused body never reaches the upstream complete, so the upstream
//! cannot act on it.

use serde::Deserialize;

/// True when `content_type` is a JSON media type FHIR uses.
pub(crate) fn is_json_media_type(content_type: &[u8]) -> bool {
    let essence = content_type
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    [
        &b"application/fhir+json"[..],
        b"application/json",
        b"application/json+fhir",
    ]
    .iter()
    .any(|t| essence.eq_ignore_ascii_case(t))
}

#[derive(Deserialize)]
struct Bundle<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: &'a str,
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    entry: Vec<Entry<'a>>,
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(borrow)]
    request: Option<Request<'a>>,
}

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow)]
    method: &'a str,
}

/// True when `body` is a JSON `batch` Bundle whose every entry is a `GET` or `HEAD`.
pub(crate) fn is_batch_of_reads(body: &[u8]) -> bool {
    let Ok(b) = serde_json::from_slice::<Bundle>(body) else {
        return false;
    };
    b.resource_type == "Bundle"
        && b.kind == "batch"
        && b.entry.iter().all(|e| {
            e.request
                .as_ref()
                .is_some_and(|r| r.method == "GET" || r.method == "HEAD")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_batches_of_reads_only() {
        let ok = br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"GET","url":"Patient?name=x"}},{"request":{"method":"HEAD","url":"Patient/1"}}]}"#;
        assert!(is_batch_of_reads(ok));
        assert!(is_batch_of_reads(
            br#"{"resourceType":"Bundle","type":"batch"}"#
        ));
        for bad in [
            &br#"{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"GET","url":"Patient"}}]}"#[..],
            br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"DELETE","url":"Patient/1"}}]}"#,
            br#"{"resourceType":"Bundle","type":"batch","entry":[{"resource":{}}]}"#,
            br#"{"resourceType":"Patient","type":"batch"}"#,
            br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"get","url":"Patient"}}]"#,
            b"<Bundle/>",
            b"",
        ] {
            assert!(!is_batch_of_reads(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn json_media_types() {
        assert!(is_json_media_type(b"application/fhir+json"));
        assert!(is_json_media_type(b"application/fhir+json; charset=utf-8"));
        assert!(is_json_media_type(b"Application/JSON"));
        assert!(!is_json_media_type(b"application/fhir+xml"));
        assert!(!is_json_media_type(b""));
    }
}
