//! The syntaxes a hot-reloaded file may be written in, one maintained reader each, with limits.
//!
//! YAML is read by serde-saphyr, which streams parser events into serde without building a node tree
//! or an event list (serde_yaml_ng keeps every event of the document: ~85 MB for a 100,000-tenant
//! table). JSON, the form generated tables should use, is read by serde_json straight from the text.
//! A file whose first non-blank character is `{` is JSON (JSON is YAML too, but the JSON reader is
//! ~30x faster); anything else is YAML.
//!
//! Limits, so a hostile or broken file costs bounded memory and time (the file's size is bounded
//! before it is read: [`super::read::MAX_FILE_BYTES`]): YAML nesting, aliases and what an anchor may
//! hold are capped below; serde_json refuses nesting deeper than 128 in what it reads, and skips
//! the rest without recursing. Duplicate keys in any YAML mapping are refused; in JSON the formats'
//! own types refuse them.
//!
//! Messages never quote the file: a value may be a credential (`upstream_headers`), so the
//! readers' source snippets are off and quoted values in their messages are cut.

use std::path::Path;

use serde::de::DeserializeSeed;

use crate::config::problems::{Problem, Problems};

/// How deep a YAML document may nest (the routing table needs four levels, the client registry five).
const MAX_DEPTH: usize = 16;
/// Aliases (`*name`) and merge keys in one YAML file: enough for hand-written files that share
/// settings through anchors; generated tables need none.
const MAX_ALIASES: usize = 10_000;
/// What one anchor may hold, in bytes of its events: with [`MAX_ALIASES`], replaying aliases can
/// add at most ~40 MB, whatever nesting an alias bomb tries.
const MAX_ANCHOR_BYTES: usize = 4 << 10;

/// Which reader a text goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    Json,
    Yaml,
}

impl Syntax {
    /// JSON when the first non-blank character is `{`.
    pub fn of(text: &str) -> Syntax {
        if text.trim_start().starts_with('{') {
            Syntax::Json
        } else {
            Syntax::Yaml
        }
    }
}

/// A reader's refusal: where it stopped and why (without the position, which is kept apart).
#[derive(Debug)]
pub struct ParseError {
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl ParseError {
    /// The problem, in `path` at key path `key` (empty when not inside an entry).
    pub fn into_problems(self, path: &Path, key: &str) -> Problems {
        Problems(vec![Problem {
            file: path.to_path_buf(),
            line: self.line,
            column: self.column,
            key: key.to_string(),
            message: self.message,
        }])
    }

    fn json(e: &serde_json::Error) -> ParseError {
        ParseError {
            line: (e.line() > 0).then_some(e.line()),
            column: (e.line() > 0).then_some(e.column()),
            message: clean_message(&e.to_string()),
        }
    }

    fn yaml(e: &serde_saphyr::Error) -> ParseError {
        let at = e.location();
        let to_usize = |n: u64| usize::try_from(n).ok().filter(|n| *n > 0);
        ParseError {
            line: at.and_then(|l| to_usize(l.line())),
            column: at.and_then(|l| to_usize(l.column())),
            message: clean_message(&e.to_string()),
        }
    }
}

/// Reads `text` (in the [`Syntax`] it is written in) through `seed`, which sees every mapping as it
/// is parsed.
pub(crate) fn parse_seed<'de, S: DeserializeSeed<'de>>(
    text: &'de str,
    seed: S,
) -> Result<S::Value, ParseError> {
    parse_seed_as(Syntax::of(text), text, seed)
}

/// [`parse_seed`] in a given syntax (JSON text is YAML too: the fuzz target comparing the two reads it
/// both ways).
pub(crate) fn parse_seed_as<'de, S: DeserializeSeed<'de>>(
    syntax: Syntax,
    text: &'de str,
    seed: S,
) -> Result<S::Value, ParseError> {
    match syntax {
        Syntax::Json => {
            let mut de = serde_json::Deserializer::from_str(text);
            let value = seed
                .deserialize(&mut de)
                .map_err(|e| ParseError::json(&e))?;
            de.end().map_err(|e| ParseError::json(&e))?;
            Ok(value)
        }
        Syntax::Yaml => {
            serde_saphyr::with_deserializer_from_str_with_options(text, yaml_options(), |de| {
                seed.deserialize(de)
            })
            .map_err(|e| ParseError::yaml(&e))
        }
    }
}

/// Reads `text` into a `T` (see `parse_seed`).
pub fn parse<'de, T: serde::Deserialize<'de>>(text: &'de str) -> Result<T, ParseError> {
    parse_seed(text, std::marker::PhantomData::<T>)
}

/// serde-saphyr's options for every hot file: the limits above, duplicate keys refused, no
/// snippets of the source in messages.
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    budget.max_aliases = MAX_ALIASES;
    budget.max_merge_keys = MAX_ALIASES;
    budget.max_recorded_anchor_bytes = MAX_ANCHOR_BYTES;
    // Events and nodes are bounded by the file's size; the defaults (1,000,000 events, 250,000
    // nodes) would refuse a 40,000-tenant table.
    let per_byte = usize::try_from(super::read::MAX_FILE_BYTES).unwrap_or(usize::MAX);
    budget.max_events = per_byte;
    budget.max_nodes = per_byte;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.alias_limits.max_total_replayed_events = MAX_ALIASES * 64;
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    options.with_snippet = false;
    options
}

/// A reader's message without the position it appends (reported apart), without advice about the
/// reader's own options, and with quoted values cut (`invalid type: string "…", expected a
/// boolean`): the value could be a credential put in the wrong field.
fn clean_message(message: &str) -> String {
    let mut m = match message.rfind(" at line ") {
        Some(i) => &message[..i],
        None => message,
    }
    .replace(", set DuplicateKeyPolicy in Options if acceptable", "");
    for kind in ["string \"", "invalid value: \""] {
        while let Some(start) = m.find(kind).map(|i| i + kind.len()) {
            let end = m[start..]
                .rfind("\", expected")
                .or_else(|| m[start..].rfind('"'))
                .map_or(m.len(), |e| start + e);
            if &m[start..end] == "…" {
                break;
            }
            m.replace_range(start..end, "…");
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_never_quote_a_value() {
        let m = clean_message(
            "invalid type: string \"Bearer s3cret\", expected a boolean at line 5 column 19",
        );
        assert_eq!(m, "invalid type: string \"…\", expected a boolean");
        let e = parse::<std::collections::BTreeMap<String, bool>>(r#"{"a": "Bearer s3cret"}"#)
            .unwrap_err();
        assert!(!e.message.contains("s3cret"), "{}", e.message);
        assert_eq!((e.line, e.column), (Some(1), Some(21)));
        let e =
            parse::<std::collections::BTreeMap<String, bool>>("a: Bearer s3cret\n").unwrap_err();
        assert!(!e.message.contains("s3cret"), "{}", e.message);
        assert_eq!(e.line, Some(1));
    }

    #[test]
    fn duplicate_yaml_keys_are_refused_without_advice_about_options() {
        let e = parse::<std::collections::BTreeMap<String, u8>>("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert!(e.message.contains("duplicate"), "{}", e.message);
        assert!(!e.message.contains("Options"), "{}", e.message);
        assert_eq!(e.line, Some(3));
    }

    /// A billion laughs: each level's anchor holds ten aliases of the one before.
    #[test]
    fn an_alias_bomb_is_refused() {
        let mut text = String::from("a0: &a0 [\"lol\"]\n");
        for i in 1..10 {
            let prev = format!("*a{}", i - 1);
            text.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", ")));
        }
        let e = parse::<serde::de::IgnoredAny>(&text).unwrap_err();
        assert!(
            e.message.contains("alias")
                || e.message.contains("anchor")
                || e.message.contains("budget"),
            "{}",
            e.message
        );
    }

    #[test]
    fn deep_nesting_is_refused_in_both_syntaxes() {
        let yaml = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert!(parse::<serde::de::IgnoredAny>(&yaml).is_err());
        // serde_json skips what nobody reads without recursing; what is read recurses at most 128
        // levels deep.
        let json = format!("{{\"a\": {}1{}}}", "[".repeat(200), "]".repeat(200));
        assert!(parse::<serde_json::Value>(&json).is_err());
        let ok = format!("{{\"a\": {}1{}}}", "[".repeat(10), "]".repeat(10));
        assert!(parse::<serde::de::IgnoredAny>(&ok).is_ok());
    }
}
