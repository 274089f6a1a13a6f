//! Hot-reloaded files (the routing table and the client registry): file events (and `SIGHUP`) →
//! debounce → read → validate as a whole → one swap.
//!
//! A [`Live<T>`] holds the current value of one file behind an `ArcSwap`; readers take a snapshot with
//! [`Live::load`] and keep it for as long as they need a consistent view. The [`Reloader`] background
//! service watches the **directory** of every file, not the file: editors save by writing a new file and
//! renaming it over the old one (a new inode), and Kubernetes ConfigMap volumes swap a `..data`
//! symlink, so a watch on the file itself goes deaf after the first edit. A file (or `..data` link)
//! *renamed into place* arrived whole, so it is reloaded at once. Any other change (an in-place write,
//! a create, a delete; also the directory and temporary link a ConfigMap update creates before its
//! rename) opens a short, fixed debounce window (a stream of writes cannot postpone the
//! reload forever), and the text must then read the same twice, [`SETTLE`] apart. Either way each file
//! is hashed as it is read, and if its text changed it is built, validated as a whole and published
//! with one `ArcSwap::store`. A loader that can build from the file as it streams by ([`FileBlocks`]:
//! the routing table, in its usual YAML shape or in JSON) never holds the whole text; the others get
//! it whole.
//! What is built must hash the same as what was checked, or the read counts as unsettled.
//! A file that is missing, unreadable, empty or invalid leaves the last good value in place and is
//! logged (the loaders' messages never quote secret values). After a large file (a 100,000-tenant
//! table) the memory it was built into is handed back to the OS: at once at start, and once reloads
//! have been quiet for [`RELEASE_AFTER`] ([`crate::memory`]). A slow poll catches events the kernel
//! dropped. The watcher is created inside the background service, after Pingora may have forked.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, Guard};
use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::services::ServiceReadyNotifier;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::problems::{whole_file, Problems};

/// A value built from one file.
pub trait Loadable: Send + Sync + Sized + 'static {
    /// What the loader needs beyond the text (defaults from the static config).
    type Context: Send + Sync + 'static;
    /// For log lines: "routing table", "client registry".
    const WHAT: &'static str;
    fn from_text(path: &Path, text: &str, ctx: &Self::Context) -> Result<Self, Problems>;
    /// [`Loadable::from_text`], also handing back what the build leaves behind (the parsed file,
    /// which may borrow from `text`), so a reload frees it after the new value is published rather
    /// than before: freeing what a 100,000-tenant table parses into is part of no request's wait.
    fn from_text_keeping_leftovers<'t>(
        path: &Path,
        text: &'t str,
        ctx: &Self::Context,
    ) -> Result<(Self, Leftovers<'t>), Problems> {
        Self::from_text(path, text, ctx).map(|value| (value, None))
    }
    /// Builds the value from the file as it is read, piece by piece, without ever holding its whole
    /// text: what a 100,000-tenant routing table needs to stay within its memory budget during a
    /// reload. `None` (the default) declines, for any reason, and the file is then read whole and
    /// built with [`Loadable::from_text_keeping_leftovers`]; so a loader returns `Some` only for a
    /// value that one would build too, and leaves every problem to it to report.
    fn from_blocks(
        _path: &Path,
        _blocks: &mut FileBlocks<'_>,
        _ctx: &Self::Context,
    ) -> Option<Self> {
        None
    }
    /// For log lines: "3 tenants".
    fn summary(&self) -> String;
}

/// What a build leaves behind for the reload to free once the new value serves (it may borrow from
/// the file's text, which the reload keeps until then).
pub type Leftovers<'t> = Option<Box<dyn Send + 't>>;

/// The current value of a hot-reloaded file, plus reload bookkeeping.
pub struct Live<T: Loadable> {
    current: ArcSwap<T>,
    path: PathBuf,
    ctx: T::Context,
    /// Hash of the text last read, whether it was accepted or rejected: unchanged text is neither
    /// rebuilt nor reported again.
    seen_hash: AtomicU64,
    /// One reload at a time. The hash above is recorded before the text is built, so without this
    /// a second reload (the self-service endpoint's own, racing the watcher's) could find the text
    /// "unchanged" and return while the first is still building it: the caller would then answer
    /// before its change serves (a new secret refused, a deleted one still accepted).
    reloading: Mutex<()>,
    /// Successful loads, starting at 1 for the load at start-up.
    pub generation: AtomicU64,
    pub failures: AtomicU64,
    /// Unix time of the last successful load.
    pub last_success: AtomicU64,
}

/// What one reload attempt did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    Unchanged,
    Applied,
    Rejected,
    /// The file changed while it was being read (a write in progress): try again shortly.
    Unsettled,
}

/// How long a changed file must stay unchanged before it is used.
const SETTLE: Duration = Duration::from_millis(25);

/// How long after the last reload of a large file its garbage is handed back to the OS (a burst of
/// reloads reuses it meanwhile). Shorter than tokio's 10 s keep-alive of idle blocking threads, so the
/// release most likely runs on the thread whose heap holds the freed pages.
pub const RELEASE_AFTER: Duration = Duration::from_secs(3);

impl<T: Loadable> Live<T> {
    /// Loads the file for the first time; failure means the proxy must not start.
    pub fn load_file(path: PathBuf, ctx: T::Context) -> Result<Live<T>, Problems> {
        let cannot_read = |e: io::Error| whole_file(&path, format!("cannot read: {e}"));
        let mut file = File::open(&path).map_err(cannot_read)?;
        // The text (when the file was read whole) and what the build left behind are freed here.
        let (value, hash, len) = {
            let mut text = String::new();
            let (built, hash, len) =
                build::<T>(&path, &mut file, &ctx, &mut text).map_err(cannot_read)?;
            let (value, _leftovers) = built?;
            (value, hash, len)
        };
        let seen_hash = AtomicU64::new(hash);
        if len >= crate::memory::LARGE_TEXT {
            crate::memory::release_freed();
        }
        Ok(Live {
            current: ArcSwap::from_pointee(value),
            path,
            ctx,
            seen_hash,
            reloading: Mutex::new(()),
            generation: AtomicU64::new(1),
            failures: AtomicU64::new(0),
            last_success: AtomicU64::new(unix_now()),
        })
    }

    /// A snapshot of the current value.
    pub fn load(&self) -> Guard<Arc<T>> {
        self.current.load()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One reload attempt (blocking: file I/O, and DNS for the routing table). With `force`, unchanged
    /// text is rebuilt too (re-resolving upstream host names). With `settle`, changed text is used only
    /// if it reads the same again [`SETTLE`] later; only a reload caused by nothing but renames skips
    /// that. Returns only once what it read is the value being served (or was rejected), also when
    /// another reload of the same file was in progress.
    pub fn reload(&self, force: bool, settle: bool) -> ReloadOutcome {
        // A panic in a loader cannot leave the guarded `()` inconsistent.
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let started = std::time::Instant::now();
        let unreadable = |e: io::Error| {
            self.failures.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "{} {} unreadable ({e}); keeping the last good one",
                T::WHAT,
                self.path.display()
            );
            ReloadOutcome::Rejected
        };
        // The file is hashed first, as it streams by: most events leave it unchanged, and a large
        // file is then neither built nor held in memory.
        let (mut file, hash, len) = match File::open(&self.path)
            .and_then(|mut f| file_hash(&mut f).map(|(h, n)| (f, h, n)))
        {
            Ok(read) => read,
            Err(e) => return unreadable(e),
        };
        if self.seen_hash.load(Ordering::Relaxed) == hash && !force {
            log::debug!("{} {} unchanged", T::WHAT, self.path.display());
            return ReloadOutcome::Unchanged;
        }
        // A file rewritten in place can be caught half-written, and a prefix of a routing table can be
        // valid YAML naming fewer tenants or a truncated port. Use it only if it reads the same twice.
        // (A file renamed into place cannot be caught half-written: rename(2) is atomic.)
        if settle && {
            std::thread::sleep(SETTLE);
            File::open(&self.path)
                .and_then(|mut f| file_hash(&mut f))
                .ok()
                .map(|(h, _)| h)
                != Some(hash)
        } {
            log::debug!("{} {} is still changing", T::WHAT, self.path.display());
            return ReloadOutcome::Unsettled;
        }
        // Built from the same open file (a rename since cannot mix two files), as it streams by
        // where the loader can. Either way what was built must be what was hashed: a write in
        // between makes this an unsettled read, tried again shortly.
        let mut text = String::new();
        let built = match build::<T>(&self.path, &mut file, &self.ctx, &mut text) {
            Ok((built, read, _)) if read == hash => built,
            Ok(_) => {
                log::debug!(
                    "{} {} changed while it was read",
                    T::WHAT,
                    self.path.display()
                );
                if len >= crate::memory::LARGE_TEXT {
                    crate::memory::mark_garbage();
                }
                return ReloadOutcome::Unsettled;
            }
            Err(e) => return unreadable(e),
        };
        // Recorded whether the text is accepted or rejected: a rejected file is not reported again
        // until it changes.
        self.seen_hash.store(hash, Ordering::Relaxed);
        let outcome = match built {
            Ok((value, leftovers)) => {
                let summary = value.summary();
                // One swap: every reader sees either the old value or the new one, whole.
                let old = self.current.swap(Arc::new(value));
                let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                self.last_success.store(unix_now(), Ordering::Relaxed);
                log::info!(
                    "{} reloaded: {summary} (generation {generation}, {} ms)",
                    T::WHAT,
                    started.elapsed().as_millis()
                );
                // Freeing a large old table, and the parsed file, takes a while; the new table is
                // already serving.
                drop(old);
                drop(leftovers);
                ReloadOutcome::Applied
            }
            Err(problems) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "{} rejected, keeping the last good one:\n{problems}",
                    T::WHAT
                );
                ReloadOutcome::Rejected
            }
        };
        // What a large file was built into (accepted or not) is garbage now; the reloader hands it
        // back to the OS once reloads have gone quiet.
        if len >= crate::memory::LARGE_TEXT {
            crate::memory::mark_garbage();
        }
        outcome
    }
}

/// Change detection for file text (not security: only the operator writes these files). Eight bytes
/// per step: byte-wise FNV-1a took ~20 ms of a 100,000-tenant reload (12 MB), this takes ~3 ms.
pub fn hash_text(text: &str) -> u64 {
    let mut hash = TextHash::default();
    hash.update(text.as_bytes());
    hash.finish()
}

/// [`hash_text`] of text that arrives in pieces: the same value however it is cut.
pub struct TextHash {
    h: u64,
    /// Bytes of a word not yet complete.
    pending: [u8; 8],
    filled: usize,
    len: u64,
}

impl Default for TextHash {
    fn default() -> Self {
        TextHash {
            h: 0xcbf2_9ce4_8422_2325,
            pending: [0; 8],
            filled: 0,
            len: 0,
        }
    }
}

impl TextHash {
    pub fn update(&mut self, mut bytes: &[u8]) {
        use crate::fasthash::{mix, mix_words};
        self.len += bytes.len() as u64;
        if self.filled > 0 {
            let take = bytes.len().min(8 - self.filled);
            self.pending[self.filled..self.filled + take].copy_from_slice(&bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            if self.filled < 8 {
                return;
            }
            self.h = mix(self.h, u64::from_le_bytes(self.pending));
            self.filled = 0;
        }
        let (h, tail) = mix_words(self.h, bytes);
        self.h = h;
        self.pending[..tail.len()].copy_from_slice(tail);
        self.filled = tail.len();
    }

    /// The zero-padded tail last, with the length (so "abc" and "abc\0" differ).
    pub fn finish(&self) -> u64 {
        use crate::fasthash::{mix, tail_word};
        mix(self.h ^ self.len, tail_word(&self.pending[..self.filled]))
    }
}

/// The hash and length of what `file` holds from where it is read to its end, read in blocks.
fn file_hash(file: &mut File) -> io::Result<(u64, usize)> {
    FileBlocks::new(file).finish()
}

/// What one build of a file gives: the value and what the build left behind (or the loader's
/// problems), and the hash and length of the text it was built from.
type Built<'t, T> = (Result<(T, Leftovers<'t>), Problems>, u64, usize);

/// Builds `file` from its start: as it streams by where the loader can ([`Loadable::from_blocks`]),
/// otherwise from its whole text, read into `text` (which what the build leaves behind may borrow).
fn build<'t, T: Loadable>(
    path: &Path,
    file: &mut File,
    ctx: &T::Context,
    text: &'t mut String,
) -> io::Result<Built<'t, T>> {
    file.rewind()?;
    let mut blocks = FileBlocks::new(file);
    if let Some(value) = T::from_blocks(path, &mut blocks, ctx) {
        let (hash, len) = blocks.finish()?;
        return Ok((Ok((value, None)), hash, len));
    }
    file.rewind()?;
    file.read_to_string(text)?;
    let text: &'t str = text;
    let built = T::from_text_keeping_leftovers(path, text, ctx);
    Ok((built, hash_text(text), text.len()))
}

/// How much of a file is read at a time: large enough that a 10 MB file is ~40 reads, small enough
/// to stay in cache while it is parsed.
const BLOCK: usize = 256 << 10;

/// A file read as consecutive runs of whole lines, each at most the buffer's size ([`BLOCK`], grown
/// to hold the longest line met); only the last may lack its line end. Or read cut anywhere, as a
/// byte stream ([`io::Read`], [`FileBlocks::skim_raw`]), which never grows the buffer. Together the
/// pieces handed out are the file, byte for byte, and [`FileBlocks::finish`] gives [`hash_text`] of
/// it. A loader's [`Loadable::from_blocks`] reads through them, and may [`FileBlocks::rewind`] to
/// read them again (one pass to size a table, one to build it). Any seekable reader will do (the
/// fuzz target reads text in memory); the proxy reads files.
pub struct FileBlocks<'f, R = File> {
    file: &'f mut R,
    buf: Vec<u8>,
    /// `buf[start..end]` is read but not yet handed out.
    start: usize,
    end: usize,
    eof: bool,
    /// Bytes handed out since the start or the last rewind.
    read: usize,
    hash: TextHash,
}

impl<'f, R: Read + Seek> FileBlocks<'f, R> {
    /// Blocks of `file` from where it is positioned.
    pub fn new(file: &'f mut R) -> Self {
        Self::with_block_size(file, BLOCK)
    }

    pub(crate) fn with_block_size(file: &'f mut R, size: usize) -> Self {
        FileBlocks {
            file,
            buf: vec![0; size.max(1)],
            start: 0,
            end: 0,
            eof: false,
            read: 0,
            hash: TextHash::default(),
        }
    }

    /// The next run of whole lines, `None` at the end of the file; an error for a read that fails or
    /// for text that is not UTF-8.
    pub fn next_block(&mut self) -> io::Result<Option<&str>> {
        match self.next_bytes()? {
            None => Ok(None),
            Some(bytes) => std::str::from_utf8(bytes).map(Some).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "stream did not contain valid UTF-8",
                )
            }),
        }
    }

    /// The next run of whole lines as bytes, neither checked nor hashed: for a quick pass (sizing
    /// what a second pass builds), which must be followed by [`FileBlocks::rewind`].
    pub fn skim(&mut self) -> io::Result<Option<&[u8]>> {
        self.cut_block(false)
    }

    fn next_bytes(&mut self) -> io::Result<Option<&[u8]>> {
        self.cut_block(true)
    }

    fn cut_block(&mut self, hash: bool) -> io::Result<Option<&[u8]>> {
        // What was read past the last block's line end moves to the front.
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        loop {
            if !self.eof {
                if self.end == self.buf.len() {
                    // A line longer than the buffer (rare: a file is short lines).
                    self.buf.resize(self.buf.len() * 2, 0);
                }
                self.fill()?;
            }
            let cut = if self.eof {
                self.end
            } else {
                match self.buf[..self.end].iter().rposition(|&b| b == b'\n') {
                    Some(i) => i + 1,
                    None => continue,
                }
            };
            if cut == 0 {
                return Ok(None);
            }
            return Ok(Some(self.hand_out(cut, hash)));
        }
    }

    /// One read into the buffer after what it holds (`buf[end..]`, which must have room), retried
    /// when interrupted; the end of the file sets `eof`.
    fn fill(&mut self) -> io::Result<()> {
        loop {
            match self.file.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The next `n` bytes read but not handed out, now handed out: counted, and hashed if asked.
    fn hand_out(&mut self, n: usize, hash: bool) -> &[u8] {
        let bytes = &self.buf[self.start..self.start + n];
        self.start += n;
        self.read += n;
        if hash {
            self.hash.update(bytes);
        }
        bytes
    }

    /// The next bytes read, cut anywhere (not at a line end), neither checked nor hashed: for a quick
    /// pass over a file that may be one long line (JSON), which must be followed by
    /// [`FileBlocks::rewind`].
    pub fn skim_raw(&mut self) -> io::Result<Option<&[u8]>> {
        self.take(usize::MAX, false)
    }

    /// At most `max` of the bytes read but not handed out, refilling the buffer (from its start,
    /// never growing it) when there are none.
    fn take(&mut self, max: usize, hash: bool) -> io::Result<Option<&[u8]>> {
        while self.start == self.end {
            if self.eof {
                return Ok(None);
            }
            self.start = 0;
            self.end = 0;
            self.fill()?;
        }
        let n = max.min(self.end - self.start);
        Ok(Some(self.hand_out(n, hash)))
    }

    /// Back to the start of the file, to read it again.
    pub fn rewind(&mut self) -> io::Result<()> {
        self.file.rewind()?;
        self.start = 0;
        self.end = 0;
        self.eof = false;
        self.read = 0;
        self.hash = TextHash::default();
        Ok(())
    }

    /// Bytes handed out since the start (or the last rewind).
    pub fn read_so_far(&self) -> usize {
        self.read
    }

    /// Reads what is left and gives the hash and length of everything since the start (or the last
    /// rewind): [`hash_text`] of the file, as it was read.
    pub fn finish(mut self) -> io::Result<(u64, usize)> {
        self.drain()?;
        Ok((self.hash.finish(), self.read_so_far()))
    }

    /// Reads and hashes what is left, cut anywhere (the hash does not depend on the cuts): a file of
    /// one long line does not grow the buffer to its size, as whole lines would.
    fn drain(&mut self) -> io::Result<()> {
        while self.take(usize::MAX, true)?.is_some() {}
        Ok(())
    }
}

/// The file as a byte stream, cut anywhere, for a reader that wants one (serde_json): what it is
/// handed is hashed and counted like the blocks, and may be followed by blocks or
/// [`FileBlocks::finish`].
impl<R: Read + Seek> io::Read for FileBlocks<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self.take(out.len(), true)? {
            None => Ok(0),
            Some(bytes) => {
                out[..bytes.len()].copy_from_slice(bytes);
                Ok(bytes.len())
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A file the [`Reloader`] keeps current (implemented by every [`Live<T>`]).
pub trait Reload: Send + Sync {
    fn path(&self) -> &Path;
    fn reload(&self, force: bool, settle: bool) -> ReloadOutcome;
}

impl<T: Loadable> Reload for Live<T> {
    fn path(&self) -> &Path {
        Live::path(self)
    }
    fn reload(&self, force: bool, settle: bool) -> ReloadOutcome {
        Live::reload(self, force, settle)
    }
}

/// What a file-system event means for the watched files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Nothing: another file, or a read (our own reads raise access events, and reacting to them
    /// would reload forever).
    None,
    /// A watched name (or a `..`-prefixed entry: the `..data` symlink of a Kubernetes ConfigMap
    /// volume) was renamed into place: the new file is complete the moment it appears.
    Whole,
    /// Any other change to a watched name or `..` entry: it may be a write still in progress.
    Partial,
}

fn watched(p: &Path, names: &BTreeSet<OsString>) -> bool {
    p.file_name()
        .is_some_and(|n| names.contains(n) || n.as_encoded_bytes().starts_with(b".."))
}

/// Classifies one event. Anything else in the directory, such as a log file, is ignored. A rename
/// *away* from a watched name (an editor moving the original to a backup before writing the new
/// file in place) is a partial change; the paired "both" event of a rename is judged by its target.
fn classify(e: &notify::Event, names: &BTreeSet<OsString>) -> Change {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
    match e.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return Change::None,
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
            return match e.paths.first() {
                Some(to) if watched(to, names) => Change::Whole,
                _ => Change::None,
            };
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
            return match (e.paths.first(), e.paths.get(1)) {
                (_, Some(to)) if watched(to, names) => Change::Whole,
                (Some(from), _) if watched(from, names) => Change::Partial,
                _ => Change::None,
            };
        }
        _ => {}
    }
    if e.paths.iter().any(|p| watched(p, names)) {
        Change::Partial
    } else {
        Change::None
    }
}

/// What happened since the last reload, set by the watcher's thread and read by the reload loop.
#[derive(Default)]
struct Seen {
    whole: AtomicBool,
    partial: AtomicBool,
}

impl Seen {
    fn note(&self, change: Change) {
        match change {
            Change::Whole => self.whole.store(true, Ordering::SeqCst),
            Change::Partial => self.partial.store(true, Ordering::SeqCst),
            Change::None => {}
        }
    }

    /// Only renames so far: the reload need not wait.
    fn only_renames(&self) -> bool {
        self.whole.load(Ordering::SeqCst) && !self.partial.load(Ordering::SeqCst)
    }

    /// Clears both flags for the reload about to run; true when that reload must check that the text
    /// has settled (any partial change, or none seen at all: a poll).
    fn take_needs_settle(&self) -> bool {
        let partial = self.partial.swap(false, Ordering::SeqCst);
        let whole = self.whole.swap(false, Ordering::SeqCst);
        partial || !whole
    }
}

/// The background service that keeps every [`Live`] file current.
pub struct Reloader {
    pub files: Vec<Arc<dyn Reload>>,
    pub debounce: Duration,
    /// Zero disables the poll.
    pub poll: Duration,
}

impl Reloader {
    /// Reloads every file; true when one of them was still being written.
    async fn reload_all(&self, force: bool, settle: bool) -> bool {
        let mut unsettled = false;
        for file in &self.files {
            let file = file.clone();
            match tokio::task::spawn_blocking(move || file.reload(force, settle)).await {
                Ok(ReloadOutcome::Unsettled) => unsettled = true,
                Ok(_) => {}
                Err(e) => log::error!("reload task failed: {e}"),
            }
        }
        unsettled
    }

    /// File names that matter in the watched directories.
    fn file_names(&self) -> BTreeSet<OsString> {
        self.files
            .iter()
            .filter_map(|f| f.path().file_name().map(ToOwned::to_owned))
            .collect()
    }

    fn directories(&self) -> BTreeSet<PathBuf> {
        self.files
            .iter()
            .map(|f| match f.path().parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .collect()
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    /// Ready once the watcher is installed: the proxy service depends on this one, so no request
    /// is served before an edit of a watched file would be noticed.
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let (tx, mut events) = mpsc::channel::<()>(1);
        // A full channel already holds a pending reload, so a failed try_send loses nothing.
        let names = self.file_names();
        let seen = Arc::new(Seen::default());
        let noted = seen.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let change = res.map_or(Change::None, |e| classify(&e, &names));
            if change != Change::None {
                noted.note(change);
                let _ = tx.try_send(());
            }
        });
        let _watcher = match watcher {
            Ok(mut w) => {
                for dir in self.directories() {
                    if let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
                        log::error!(
                            "cannot watch {} ({e}); its files reload only on SIGHUP and every poll",
                            dir.display()
                        );
                    }
                }
                Some(w)
            }
            Err(e) => {
                log::error!(
                    "cannot start the file watcher ({e}); reloads only on SIGHUP and every poll"
                );
                None
            }
        };
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!("cannot install the SIGHUP handler: {e}");
                None
            }
        };
        // Far enough away to mean "never" when polling is off.
        let poll = if self.poll.is_zero() {
            Duration::from_secs(86_400 * 365)
        } else {
            self.poll
        };
        let mut next_poll = Instant::now() + poll;
        let mut pending: Option<Instant> = None;
        // When to hand a large reload's garbage back to the OS (moved on by every reload).
        let mut release: Option<Instant> = None;
        ready.notify_ready();
        loop {
            let wake = pending.unwrap_or(next_poll);
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(()) = events.recv() => {
                    if seen.only_renames() {
                        // A complete file is in place: no reason to wait.
                        pending = Some(Instant::now());
                    } else {
                        // Fixed window from the first event: a stream of writes cannot starve the
                        // reload.
                        pending.get_or_insert(Instant::now() + self.debounce);
                    }
                }
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    log::info!("SIGHUP: reloading");
                    if self.reload_all(true, true).await {
                        pending = Some(Instant::now() + self.debounce);
                    }
                    release = release_time(release);
                }
                _ = async {
                    match release {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    release = None;
                    if let Err(e) = tokio::task::spawn_blocking(crate::memory::release_marked).await {
                        log::error!("memory release task failed: {e}");
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    if pending.take().is_none() {
                        next_poll = Instant::now() + poll;
                    }
                    let settle = seen.take_needs_settle();
                    if self.reload_all(false, settle).await {
                        pending = Some(Instant::now() + self.debounce);
                    }
                    release = release_time(release);
                }
            }
        }
    }
}

/// After a reload: a release [`RELEASE_AFTER`] from now if a large file left garbage, else `current`.
fn release_time(current: Option<Instant>) -> Option<Instant> {
    if crate::memory::is_marked() {
        Some(Instant::now() + RELEASE_AFTER)
    } else {
        current
    }
}

#[cfg(test)]
mod tests {
    use super::{
        classify, hash_text, Change, File, FileBlocks, Live, Loadable, ReloadOutcome, Seen,
        TextHash,
    };
    use crate::config::problems::Problems;
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind, RemoveKind,
        RenameMode,
    };
    use std::collections::BTreeSet;
    use std::ffi::OsString;
    use std::path::Path;
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
    /// longer does). Stop 11's CI machine caught the endpoint answering first under load.
    #[test]
    fn a_reload_returns_only_once_what_it_read_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "one").unwrap();
        let live =
            Arc::new(Live::<Slow>::load_file(path.clone(), Duration::from_millis(400)).unwrap());
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

    /// A file built from its blocks where it can be, from its whole text otherwise; the context is a
    /// write to make to the file while its first block is being built.
    struct Streamed(String);

    impl Loadable for Streamed {
        type Context = std::sync::Mutex<Option<(std::path::PathBuf, &'static str)>>;
        const WHAT: &'static str = "streamed file";
        fn from_text(_: &Path, text: &str, _: &Self::Context) -> Result<Self, Problems> {
            Ok(Streamed(format!("whole: {text}")))
        }
        fn from_blocks(
            _: &Path,
            blocks: &mut FileBlocks<'_>,
            write: &Self::Context,
        ) -> Option<Self> {
            let mut all = String::new();
            while let Some(block) = blocks.next_block().ok()? {
                all.push_str(block);
                if let Some((path, text)) = write.lock().unwrap().take() {
                    std::fs::write(path, text).unwrap();
                }
            }
            Some(Streamed(all))
        }
        fn summary(&self) -> String {
            String::new()
        }
    }

    /// A file written in place while it is being built is not used: what was built is not what was
    /// hashed (part old, part new). The reload says so, the last value stays, and the next reload
    /// builds the new text.
    #[test]
    fn a_file_written_while_it_is_built_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "one\n").unwrap();
        let live = Live::<Streamed>::load_file(path.clone(), Default::default()).unwrap();
        assert_eq!(live.load().0, "one\n", "built from its blocks");
        std::fs::write(&path, "two\n").unwrap();
        *live.ctx.lock().unwrap() = Some((path.clone(), "three three\n"));
        assert_eq!(live.reload(false, false), ReloadOutcome::Unsettled);
        assert_eq!(live.load().0, "one\n", "a torn read was served");
        assert_eq!(live.reload(false, false), ReloadOutcome::Applied);
        assert_eq!(live.load().0, "three three\n");
        assert_eq!(live.reload(false, false), ReloadOutcome::Unchanged);
    }

    /// Blocks are whole lines, together the file byte for byte, whatever the block size (a line
    /// longer than a block comes whole too), and their hash is the whole text's.
    #[test]
    fn file_blocks_are_whole_lines_that_make_up_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let text = "a\nbb\n\nccc ccc ccc ccc\r\nd\néé\nno line end";
        std::fs::write(&path, text).unwrap();
        for size in [1, 2, 3, 5, 8, 64] {
            let mut file = File::open(&path).unwrap();
            let mut blocks = FileBlocks::with_block_size(&mut file, size);
            let mut got = Vec::new();
            while let Some(b) = blocks.next_block().unwrap() {
                got.push(b.to_string());
            }
            assert_eq!(got.concat(), text, "block size {size}");
            for b in &got[..got.len() - 1] {
                assert!(b.ends_with('\n'), "block size {size}: {b:?}");
            }
            assert_eq!(blocks.read_so_far(), text.len());
            blocks.rewind().unwrap();
            let mut again = String::new();
            while let Some(b) = blocks.skim().unwrap() {
                again.push_str(std::str::from_utf8(b).unwrap());
            }
            assert_eq!(again, text, "skimmed after a rewind");
            blocks.rewind().unwrap();
            let first = blocks.next_block().unwrap().unwrap().to_string();
            assert!(text.starts_with(&first), "rewound");
            assert_eq!(blocks.finish().unwrap(), (hash_text(text), text.len()));
        }
        std::fs::write(&path, b"ok\n\xff\n").unwrap();
        let mut file = File::open(&path).unwrap();
        let mut blocks = FileBlocks::with_block_size(&mut file, 3);
        assert_eq!(blocks.next_block().unwrap(), Some("ok\n"));
        assert!(blocks.next_block().is_err(), "not UTF-8");
    }

    /// Read as a byte stream (as serde_json reads a JSON table), cut anywhere, the blocks never grow
    /// past their size however long a line is, give the file byte for byte, and hash as the text;
    /// blocks may follow, and `finish` hashes the rest.
    #[test]
    fn file_blocks_read_as_a_stream_make_up_the_file_without_growing() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let text = format!("{{\"one line\": \"{}\"}}\nnext\nlast", "x".repeat(100));
        std::fs::write(&path, &text).unwrap();
        for size in [1, 3, 8, 64] {
            for chunk in [1, 2, 5, 1000] {
                let mut file = File::open(&path).unwrap();
                let mut blocks = FileBlocks::with_block_size(&mut file, size);
                let mut skimmed = Vec::new();
                while let Some(b) = blocks.skim_raw().unwrap() {
                    assert!(
                        b.len() <= size,
                        "a skim of {} bytes, block size {size}",
                        b.len()
                    );
                    skimmed.extend_from_slice(b);
                }
                assert_eq!(skimmed, text.as_bytes(), "skimmed, block size {size}");
                blocks.rewind().unwrap();
                let mut got = Vec::new();
                let mut buf = vec![0; chunk];
                loop {
                    let n = blocks.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                assert_eq!(got, text.as_bytes(), "block size {size}, reads of {chunk}");
                assert_eq!(blocks.buf.len(), size, "the buffer did not grow");
                assert_eq!(blocks.finish().unwrap(), (hash_text(&text), text.len()));
                // Part read as a stream, the rest drained: still the whole file's hash.
                let mut file = File::open(&path).unwrap();
                let mut blocks = FileBlocks::with_block_size(&mut file, size);
                let mut buf = vec![0; chunk.min(7)];
                let n = blocks.read(&mut buf).unwrap();
                assert_eq!(&buf[..n], &text.as_bytes()[..n]);
                blocks.drain().unwrap();
                assert_eq!(blocks.buf.len(), size, "draining did not grow the buffer");
                assert_eq!(blocks.finish().unwrap(), (hash_text(&text), text.len()));
            }
        }
    }

    #[test]
    fn the_text_hash_is_the_same_however_the_text_is_cut() {
        let text: Vec<u8> = (0..100u8).collect();
        let whole = {
            let mut h = TextHash::default();
            h.update(&text);
            h.finish()
        };
        for a in 0..text.len() {
            for b in [a, a + 1, a + 7, a + 9, text.len()] {
                let b = b.min(text.len());
                let mut h = TextHash::default();
                h.update(&text[..a]);
                h.update(&text[a..b]);
                h.update(&text[b..]);
                assert_eq!(h.finish(), whole, "cut at {a} and {b}");
            }
        }
    }

    fn event(kind: EventKind, paths: &[&str]) -> notify::Event {
        paths
            .iter()
            .fold(notify::Event::new(kind), |e, p| e.add_path(p.into()))
    }

    #[test]
    fn only_a_rename_into_a_watched_name_counts_as_a_whole_file() {
        let names: BTreeSet<OsString> = ["routes.yaml", "clients.yaml"]
            .iter()
            .map(OsString::from)
            .collect();
        let c = |kind, paths: &[&str]| classify(&event(kind, paths), &names);
        let rename = |mode| EventKind::Modify(ModifyKind::Name(mode));
        assert_eq!(
            c(rename(RenameMode::To), &["/c/routes.yaml"]),
            Change::Whole
        );
        assert_eq!(c(rename(RenameMode::To), &["/c/..data"]), Change::Whole);
        assert_eq!(
            c(rename(RenameMode::Both), &["/c/.tmp", "/c/clients.yaml"]),
            Change::Whole
        );
        // An editor moving the original aside before writing the new file in place.
        assert_eq!(
            c(
                rename(RenameMode::Both),
                &["/c/routes.yaml", "/c/routes.yaml~"]
            ),
            Change::Partial
        );
        assert_eq!(
            c(rename(RenameMode::From), &["/c/routes.yaml"]),
            Change::Partial
        );
        assert_eq!(
            c(rename(RenameMode::To), &["/c/routes.yaml~"]),
            Change::None
        );
        assert_eq!(
            c(rename(RenameMode::Both), &["/c/a", "/c/b.log"]),
            Change::None
        );
        for kind in [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Remove(RemoveKind::File),
        ] {
            assert_eq!(c(kind, &["/c/routes.yaml"]), Change::Partial, "{kind:?}");
            assert_eq!(c(kind, &["/c/access.log"]), Change::None, "{kind:?}");
        }
        for kind in [
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
        ] {
            assert_eq!(c(kind, &["/c/routes.yaml"]), Change::None, "{kind:?}");
        }
    }

    #[test]
    fn a_reload_skips_the_settle_check_only_after_nothing_but_renames() {
        let seen = Seen::default();
        assert!(seen.take_needs_settle(), "a poll settles");
        seen.note(Change::Whole);
        assert!(seen.only_renames());
        assert!(!seen.take_needs_settle());
        assert!(!seen.only_renames(), "flags are cleared by the reload");
        seen.note(Change::Whole);
        seen.note(Change::Partial);
        assert!(!seen.only_renames());
        assert!(seen.take_needs_settle());
        seen.note(Change::None);
        assert!(seen.take_needs_settle());
    }

    #[test]
    fn hash_text_changes_with_any_byte_the_length_and_word_order() {
        let base: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap_or_default();
        let h = hash_text(&text(&base));
        assert_eq!(h, hash_text(&text(&base)), "same text, same hash");
        for pos in [0, 1, 7, 8, 500, 991, 992, 999] {
            let mut b = base.clone();
            b[pos] = b'#';
            assert_ne!(
                hash_text(&text(&b)),
                h,
                "a change at byte {pos} went unseen"
            );
        }
        // The tail is zero-padded, so the length must tell "abc" from "abc\0".
        assert_ne!(hash_text("abc"), hash_text("abc\0"));
        assert_ne!(hash_text(""), hash_text("\0"));
        assert_ne!(hash_text("aaaaaaaabbbbbbbb"), hash_text("bbbbbbbbaaaaaaaa"));
        assert_ne!(hash_text(&text(&base)), hash_text(&text(&base[..999])));
    }
}
