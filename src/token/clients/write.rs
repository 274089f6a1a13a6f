//! Changing `clients.yaml`. Every change (the CLI, the self-service endpoint) goes through
//! [`update_file`]: under an exclusive lock, read, change, validate the whole result, write a temporary
//! file, fsync, rename over the original, fsync the directory, so the running proxy (and any
//! concurrent writer) only ever sees a complete, valid file.

use std::path::Path;

use super::change::{Change, StoreError};
use super::file::{ClientsFile, HEADER};
use super::registry::ClientRegistry;
use crate::atomic_file::{sibling, write_atomically};
use crate::reload::Loadable;

/// Reads `path` (a missing file counts as an empty registry), applies `change`, validates the whole
/// result and replaces the file atomically, all under an exclusive lock on `<path>.lock`.
pub(crate) fn update_file<R>(
    path: &Path,
    change: impl FnOnce(&mut ClientsFile) -> Result<R, StoreError>,
) -> Result<R, StoreError> {
    let io = StoreError::File;
    let lock_path = sibling(path, ".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io(format!("cannot open {}: {e}", lock_path.display())))?;
    lock.lock()
        .map_err(|e| io(format!("cannot lock {}: {e}", lock_path.display())))?;
    let mut file = parse_file(path)?;
    let result = change(&mut file)?;
    let body = serde_yaml_ng::to_string(&file).map_err(|e| io(format!("cannot serialise: {e}")))?;
    let text = format!("{HEADER}{body}");
    // Never write a file the proxy would reject.
    ClientRegistry::from_text(path, &text, &()).map_err(|p| StoreError::Invalid(p.to_string()))?;
    write_atomically(path, text.as_bytes()).map_err(io)?;
    drop(lock);
    Ok(result)
}

/// Applies one change to `path` (see [`update_file`]).
pub(crate) fn apply_to_file(path: &Path, change: Change) -> Result<(), StoreError> {
    update_file(path, |f| f.apply(change))
}

/// The file's contents as they are (a missing file counts as an empty registry).
pub(crate) fn read_file(path: &Path) -> Result<ClientsFile, StoreError> {
    parse_file(path)
}

fn parse_file(path: &Path) -> Result<ClientsFile, StoreError> {
    let io = StoreError::File;
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => serde_yaml_ng::from_str(&text)
            .map_err(|e| io(format!("{} does not parse: {e}", path.display()))),
        Ok(_) => Ok(ClientsFile::default()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClientsFile::default()),
        Err(e) => Err(io(format!("cannot read {}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::secrets::new_secret;
    use super::super::file::ClientEntry;
    use super::*;

    #[test]
    fn update_file_writes_atomically_and_refuses_invalid_results() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clients.yaml");
        let s = new_secret(1_000, None).unwrap();
        let entry = s.entry.clone();
        update_file(&path, |f| {
            f.clients.0.push((
                "c1".into(),
                ClientEntry {
                    name: "Teams".into(),
                    allowed_tenants: vec!["*".into()],
                    disabled: false,
                    secrets: vec![entry],
                },
            ));
            Ok(())
        })
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# fhir-edge client registry"));
        assert!(!text.contains(&s.secret), "the secret itself was written");
        let r = ClientRegistry::from_text(&path, &text, &()).unwrap();
        assert!(r.authenticate("c1", s.secret.as_bytes(), 2_000).is_some());
        // A change that would make the file invalid is refused and the file is untouched.
        let e = update_file(&path, |f| {
            f.get_mut("c1")?.allowed_tenants = vec![];
            Ok(())
        })
        .unwrap_err();
        assert!(e.to_string().contains("invalid"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
}
