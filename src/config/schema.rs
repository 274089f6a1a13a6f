//! JSON Schemas of the three files an operator writes (`fhir-edge.yaml`, `routes.yaml`,
//! `clients.yaml`), generated from the same serde structs that read them, so they cannot drift. They
//! describe the shape (keys, types, defaults); the values' rules are `fhir-edge check`'s. Shipped in
//! `conf/schema/` for editors (`# yaml-language-server: $schema=…`) and CI pipelines, and printed by
//! `fhir-edge schema config|routes|clients`.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;

/// Which file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SchemaFile {
    /// `fhir-edge.yaml`
    Config,
    /// `routes.yaml` (or its JSON form)
    Routes,
    /// `clients.yaml`
    Clients,
}

fn schema_of<T: JsonSchema>(title: &str) -> serde_json::Value {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let mut schema = generator.into_root_schema_for::<T>();
    schema.insert("title".into(), title.into());
    schema.to_value()
}

impl SchemaFile {
    /// The schema, as JSON.
    pub(crate) fn schema(self) -> serde_json::Value {
        match self {
            SchemaFile::Config => schema_of::<super::Settings>("fhir-edge.yaml"),
            SchemaFile::Routes => schema_of::<super::routes::RoutesFile>("routes.yaml"),
            SchemaFile::Clients => schema_of::<crate::token::clients::ClientsFile>("clients.yaml"),
        }
    }

    /// Where the shipped copy lives, below the repository.
    #[cfg(test)]
    fn shipped(self) -> &'static str {
        match self {
            SchemaFile::Config => "conf/schema/fhir-edge.schema.json",
            SchemaFile::Routes => "conf/schema/routes.schema.json",
            SchemaFile::Clients => "conf/schema/clients.schema.json",
        }
    }

    /// The schema as the shipped file holds it: pretty JSON and a newline.
    pub(crate) fn text(self) -> String {
        let mut t = serde_json::to_string_pretty(&self.schema()).unwrap_or_default();
        t.push('\n');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_schemas_are_what_this_build_generates() {
        for f in [SchemaFile::Config, SchemaFile::Routes, SchemaFile::Clients] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(f.shipped());
            let shipped = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                shipped == f.text(),
                "{} is stale: run `cargo run -- schema {} > {}`",
                f.shipped(),
                format!("{f:?}").to_lowercase(),
                f.shipped()
            );
        }
    }

    #[test]
    fn the_schemas_refuse_unknown_keys_like_the_readers() {
        let config = SchemaFile::Config.schema();
        assert_eq!(config["additionalProperties"], false);
        assert!(config["properties"]["portal"].is_object());
        let routes = SchemaFile::Routes.schema();
        assert_eq!(routes["additionalProperties"], false);
        assert_eq!(routes["required"], serde_json::json!(["tenants"]));
    }
}
