use super::{Live, Loadable, ReloadOutcome};
use crate::config::problems::{whole_file, Problems};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// A file whose value takes the context's time to build.
struct Slow(String);

impl Loadable for Slow {
    type Context = Duration;
    const WHAT: &'static str = "slow file";
    fn from_text(_: &Path, text: &str, build_time: &Duration) -> Result<Self, Problems> {
        std::thread::sleep(*build_time);
        Ok(Slow(text.to_string()))
    }
    fn summary(&self) -> String {
        String::new()
    }
}

/// The self-service endpoint renames clients.yaml into place and reloads it itself, while the
/// watcher reloads the same rename. Whichever returns second must not return before the new
/// text serves: the endpoint's reply promises that the new secret works (or the old one no
/// longer does).
#[test]
fn a_reload_returns_only_once_what_it_read_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, "one").unwrap();
    let live = Arc::new(Live::<Slow>::load_file(path.clone(), Duration::from_millis(400)).unwrap());
    let tmp = dir.path().join("f.new");
    std::fs::write(&tmp, "two").unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let watcher = {
        let live = Arc::clone(&live);
        std::thread::spawn(move || live.reload(false, false))
    };
    // The watcher's reload has read "two" and is building it.
    std::thread::sleep(Duration::from_millis(100));
    let own = live.reload(false, false);
    assert_eq!(
        live.load().0,
        "two",
        "a reload returned ({own:?}) before the text it read was served"
    );
    let first = watcher.join().unwrap();
    assert!(
        [first, own].contains(&ReloadOutcome::Applied),
        "one of the two applied the change"
    );
}

/// A file whose build writes new text into the file (the context says what, once): the text it
/// was built from and the text now in the file differ.
struct Rewriting(String);

impl Loadable for Rewriting {
    type Context = std::sync::Mutex<Option<(std::path::PathBuf, &'static str)>>;
    const WHAT: &'static str = "rewritten file";
    fn from_text(_: &Path, text: &str, write: &Self::Context) -> Result<Self, Problems> {
        if let Some((path, new)) = write.lock().unwrap().take() {
            std::fs::write(path, new).unwrap();
        }
        if text.contains("bad") {
            return Err(whole_file(Path::new("f"), "bad"));
        }
        Ok(Rewriting(text.to_string()))
    }
    fn summary(&self) -> String {
        String::new()
    }
}

/// A file written in place while it is being built: what serves is one whole text, never a mix,
/// and the next reload builds the newer text.
#[test]
fn a_file_written_while_it_is_built_is_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, "one\n").unwrap();
    let live =
        Live::<Rewriting>::load_file(path.clone(), <Rewriting as Loadable>::Context::default())
            .unwrap();
    std::fs::write(&path, "two\n").unwrap();
    *live.ctx.lock().unwrap() = Some((path.clone(), "three three\n"));
    assert_eq!(live.reload(false, false), ReloadOutcome::Applied);
    assert_eq!(live.load().0, "two\n");
    assert_eq!(live.reload(false, true), ReloadOutcome::Applied);
    assert_eq!(live.load().0, "three three\n");
    assert_eq!(live.reload(false, false), ReloadOutcome::Unchanged);
}

/// Unreadable, too large or invalid: the last good value keeps serving, each failure is counted,
/// and a rejected text is not rebuilt (nor reported) again until it changes.
#[test]
fn a_bad_file_keeps_the_last_good_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, "good\n").unwrap();
    let live =
        Live::<Rewriting>::load_file(path.clone(), <Rewriting as Loadable>::Context::default())
            .unwrap();
    std::fs::write(&path, "bad\n").unwrap();
    assert_eq!(live.reload(false, false), ReloadOutcome::Rejected);
    assert_eq!(live.reload(false, false), ReloadOutcome::Unchanged);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(super::read::MAX_FILE_BYTES + 1)
        .unwrap();
    assert_eq!(live.reload(false, false), ReloadOutcome::Rejected);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(live.reload(false, false), ReloadOutcome::Rejected);
    assert_eq!(live.load().0, "good\n");
    assert_eq!(live.failures.load(Ordering::Relaxed), 3);
    assert_eq!(live.generation.load(Ordering::Relaxed), 1);
}

/// Every check that reads the file records when it ran, changed or not; one that cannot read it
/// does not (so an alert on the age of the last check also fires for a file that went missing).
#[test]
fn every_check_that_reads_the_file_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, "good\n").unwrap();
    let live =
        Live::<Rewriting>::load_file(path.clone(), <Rewriting as Loadable>::Context::default())
            .unwrap();
    live.last_check.store(1, Ordering::Relaxed);
    assert_eq!(live.reload(false, false), ReloadOutcome::Unchanged);
    assert!(live.last_check.load(Ordering::Relaxed) > 1);
    live.last_check.store(1, Ordering::Relaxed);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(live.reload(false, false), ReloadOutcome::Rejected);
    assert_eq!(live.last_check.load(Ordering::Relaxed), 1);
}
