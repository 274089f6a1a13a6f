//! Validation problems: what is wrong, in which file, at which line and key path.
//!
//! Every loader (static config, routing table, keys) collects *all* its problems before giving up, so an
//! operator fixes a file in one pass (`fhir-edge check` prints them all). Problems never quote secret
//! values: they name the key path and say what is wrong with it.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{Serialize, Serializer};

/// One thing wrong with one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based line and column, when they are known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted key path such as `tenants.145f….upstream`; empty for whole-file problems.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key, self.message)
        }
    }
}

/// A non-empty list of problems (the error type of every loader).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// A file being validated: its path and text, to attach positions to problems.
pub(crate) struct Source<'a> {
    pub path: &'a Path,
    pub text: &'a str,
    pub problems: Vec<Problem>,
}

impl<'a> Source<'a> {
    pub(crate) fn new(path: &'a Path, text: &'a str) -> Self {
        Source {
            path,
            text,
            problems: Vec::new(),
        }
    }

    /// Records a problem at the first line where `needle` appears (a key or value as written in the
    /// file), or without a position when it does not appear verbatim.
    pub(crate) fn at(&mut self, needle: &str, key: impl Into<String>, message: impl Into<String>) {
        let (line, column) = match self.locate(needle) {
            Some((l, c)) => (Some(l), Some(c)),
            None => (None, None),
        };
        self.problems.push(Problem {
            file: self.path.to_path_buf(),
            line,
            column,
            key: key.into(),
            message: message.into(),
        });
    }

    /// How many problems are recorded so far.
    pub(crate) fn len(&self) -> usize {
        self.problems.len()
    }

    /// Records a serde/YAML error, with the position the parser reported.
    pub(crate) fn yaml_error(&mut self, err: &serde_yaml_ng::Error) {
        let (line, column) = match err.location() {
            Some(loc) => (Some(loc.line()), Some(loc.column())),
            None => (None, None),
        };
        // serde_yaml_ng's message already carries the key path ("tenants.x: unknown field …") and
        // then repeats the position, which we print ourselves.
        let text = err.to_string();
        let message = match text.rfind(" at line ") {
            Some(i) => text[..i].to_string(),
            None => text,
        };
        self.problems.push(Problem {
            file: self.path.to_path_buf(),
            line,
            column,
            key: String::new(),
            message,
        });
    }

    fn locate(&self, needle: &str) -> Option<(usize, usize)> {
        if needle.is_empty() {
            return None;
        }
        self.text
            .lines()
            .enumerate()
            .find_map(|(i, line)| line.find(needle).map(|c| (i + 1, c + 1)))
    }

    /// Ok when nothing was recorded.
    pub(crate) fn finish(self) -> Result<(), Problems> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(Problems(self.problems))
        }
    }
}

/// A problem about a file as a whole (unreadable, empty).
pub(crate) fn whole_file(path: &Path, message: impl Into<String>) -> Problems {
    Problems(vec![Problem {
        file: path.to_path_buf(),
        line: None,
        column: None,
        key: String::new(),
        message: message.into(),
    }])
}

/// A YAML mapping read in file order with duplicate keys kept, so validation can report a key given
/// twice (also in two spellings) instead of a map silently keeping the last one. Written back as a
/// mapping in the same order.
/// The keys are `String`s unless the file's reader can borrow them from its text (`K = Cow<str>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OrderedMap<V, K = String>(pub Vec<(K, V)>);

impl<V, K> Default for OrderedMap<V, K> {
    fn default() -> Self {
        OrderedMap(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>, K: Deserialize<'de>> Deserialize<'de> for OrderedMap<V, K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V2<V, K>(std::marker::PhantomData<(V, K)>);
        impl<'de, V: Deserialize<'de>, K: Deserialize<'de>> Visitor<'de> for V2<V, K> {
            type Value = OrderedMap<V, K>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = m.next_entry::<K, V>()? {
                    v.push(entry);
                }
                Ok(OrderedMap(v))
            }
        }
        d.deserialize_map(V2(std::marker::PhantomData))
    }
}

impl<V: schemars::JsonSchema, K> schemars::JsonSchema for OrderedMap<V, K> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        format!("Map_of_{}", V::schema_name()).into()
    }

    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "additionalProperties": g.subschema_for::<V>()
        })
    }
}

impl<V: Serialize, K: Serialize> Serialize for OrderedMap<V, K> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}
