//! Opening the data directory: a damaged one is reported once, with the way out, instead of a
//! panic or a crash loop; with `--recover-from-peers` it is moved aside and refilled by the peers.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::SystemTime;

use crate::config::Config;
use crate::store::{Store, StoreError};

/// The thread the store is opened on: its panics are caught and reported, not printed.
const OPEN_THREAD: &str = "stickd-open";

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "data_dir '{}' is damaged ({reason}); its entries are on the peers: start once with \
         --recover-from-peers to move it aside and refill it from them, or restore it from a backup",
        dir.display()
    )]
    Damaged { dir: PathBuf, reason: String },
    #[error("data_dir '{}': {source}", dir.display())]
    Store { dir: PathBuf, source: StoreError },
    #[error("cannot move the damaged data_dir '{}' aside: {source}", dir.display())]
    MoveAside {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Opens the store of `config.data_dir`. A damaged directory (sled reports corruption, fails
/// on a record, or panics reading it) is `Damaged`; with `config.recover_from_peers` it is moved
/// aside (logged) and an empty store opened in its place, which the peers' snapshots refill.
pub fn open(config: &Config) -> Result<Store, DataDirError> {
    let dir = config.data_dir.clone();
    let reason = match open_contained(config) {
        Ok(store) => {
            if config.recover_from_peers {
                tracing::info!(data_dir = %dir.display(), "--recover-from-peers: the data_dir opens fine, kept as it is");
            }
            return Ok(store);
        }
        Err(Opened::Failed(e)) if !is_damage(&e) => {
            return Err(DataDirError::Store { dir, source: e });
        }
        Err(Opened::Failed(e)) => e.to_string(),
        Err(Opened::Panicked(why)) => format!("sled gave up reading it: {why}"),
    };
    if !config.recover_from_peers {
        return Err(DataDirError::Damaged { dir, reason });
    }
    let aside = move_aside(&dir).map_err(|source| DataDirError::MoveAside {
        dir: dir.clone(),
        source,
    })?;
    tracing::warn!(data_dir = %dir.display(), moved_to = %aside.display(), reason = %reason, "damaged data_dir moved aside: starting empty, the peers refill it");
    match open_contained(config) {
        Ok(store) => Ok(store),
        Err(Opened::Failed(e)) => Err(DataDirError::Store { dir, source: e }),
        Err(Opened::Panicked(why)) => Err(DataDirError::Damaged {
            dir,
            reason: format!("sled gave up on an empty store: {why}"),
        }),
    }
}

enum Opened {
    Failed(StoreError),
    Panicked(String),
}

/// `Store::open` on a thread of its own, its panic (sled indexes past the end of a truncated
/// file) caught and turned into a message.
fn open_contained(config: &Config) -> Result<Store, Opened> {
    install_quiet_hook();
    let result = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name(OPEN_THREAD.to_owned())
            .spawn_scoped(s, || {
                catch_unwind(AssertUnwindSafe(|| Store::open(config))).map_err(|p| {
                    let msg = p
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| p.downcast_ref::<&str>().copied())
                        .unwrap_or("no message");
                    // sled's messages may dump whole keys: the start says what went wrong.
                    let msg: String = if msg.chars().count() > 160 {
                        msg.chars().take(160).chain("...".chars()).collect()
                    } else {
                        msg.to_owned()
                    };
                    match PANIC_AT.with(|a| a.take()) {
                        Some(at) => format!("{msg} at {at}"),
                        None => msg,
                    }
                })
            })
            .map(|h| h.join())
    });
    match result {
        Ok(Ok(Ok(Ok(store)))) => Ok(store),
        Ok(Ok(Ok(Err(e)))) => Err(Opened::Failed(e)),
        Ok(Ok(Err(why))) => Err(Opened::Panicked(why)),
        Ok(Err(_)) => Err(Opened::Panicked("the open thread died".to_owned())),
        Err(e) => Err(Opened::Failed(StoreError::Sled(sled::Error::Io(e)))),
    }
}

std::thread_local! {
    /// Where the open thread panicked, for the report.
    static PANIC_AT: std::cell::Cell<Option<String>> = const { std::cell::Cell::new(None) };
}

/// A panic hook that keeps the open thread's panics quiet (they are reported as one error) and
/// hands every other panic to the hook that was there before.
fn install_quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some(OPEN_THREAD) {
                let at = info.location().map(ToString::to_string);
                PANIC_AT.with(|a| a.set(at));
                return;
            }
            previous(info);
        }));
    });
}

/// Whether an open error means the files are damaged (as opposed to, say, a permission).
fn is_damage(e: &StoreError) -> bool {
    match e {
        StoreError::Corrupt { .. } => true,
        StoreError::Sled(sled::Error::Corruption { .. } | sled::Error::ReportableBug(_)) => true,
        StoreError::Sled(sled::Error::Io(io)) => matches!(
            io.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
        ),
        _ => false,
    }
}

/// Moves `dir` aside as `<dir>.damaged-<unix seconds>` beside it. When its parent is not ours to
/// write (systemd's StateDirectory is the data_dir itself, under a read-only /var/lib), its
/// content moves instead into `<dir>/damaged-<unix seconds>`, which sled ignores.
pub fn move_aside(dir: &Path) -> std::io::Result<PathBuf> {
    let stamp = common::time::unix_secs(SystemTime::now());
    let name = dir
        .file_name()
        .map_or_else(|| "data".into(), |n| n.to_string_lossy().into_owned());
    let beside = free_name(|n| dir.with_file_name(format!("{name}.damaged-{stamp}{n}")));
    match std::fs::rename(dir, &beside) {
        Ok(()) => return Ok(beside),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(e),
        Err(e) => {
            tracing::debug!(error = %e, to = %beside.display(), "cannot rename the data_dir: moving its content into it instead");
        }
    }
    move_inside(dir, stamp)
}

/// Moves the content of `dir` into a new `<dir>/damaged-<stamp>`, earlier ones excepted.
fn move_inside(dir: &Path, stamp: i64) -> std::io::Result<PathBuf> {
    let inside = free_name(|n| dir.join(format!("{DAMAGED_PREFIX}{stamp}{n}")));
    std::fs::create_dir(&inside)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let file = entry.file_name();
        if file.to_string_lossy().starts_with(DAMAGED_PREFIX) {
            continue;
        }
        std::fs::rename(entry.path(), inside.join(file))?;
    }
    Ok(inside)
}

/// Directories inside a data_dir that hold an earlier damaged content (see `move_aside`).
const DAMAGED_PREFIX: &str = "damaged-";

/// The first of `make("")`, `make("-1")`, `make("-2")`... that does not exist.
fn free_name(make: impl Fn(String) -> PathBuf) -> PathBuf {
    let mut n = 0u32;
    loop {
        let p = make(if n == 0 {
            String::new()
        } else {
            format!("-{n}")
        });
        if !p.exists() {
            return p;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::SourceFile;
    use proto::stick::v1 as pb;

    fn config(dir: &Path, recover: bool) -> Config {
        let text = format!(
            r#"
data_dir = "{}"
socket = "{}/s.sock"
[[peers]]
name = "a"
address = "127.0.0.1:1"
[[peers]]
name = "b"
address = "127.0.0.2:1"
[[tables]]
name = "web"
type = "string"
len = 32
size = "100k"
expire = "5m"
"#,
            dir.join("data").display(),
            dir.display()
        );
        let mut c =
            Config::from_source(&SourceFile::from_text("t.toml", text), Some("a")).expect("config");
        c.recover_from_peers = recover;
        c
    }

    /// A data_dir of 30k entries (sled's `db` spans several segments), flushed and closed.
    fn filled(dir: &Path) -> Config {
        let c = config(dir, false);
        let store = Store::open(&c).expect("open");
        for batch in 0..30 {
            let items: Vec<pb::StoreItem> = (0..1000)
                .map(|i| pb::StoreItem {
                    key: format!("k{batch}-{i}"),
                    server: "app1".into(),
                    expires_unix_ms: 0,
                })
                .collect();
            store.store("web", &items).expect("store");
            store.persist().expect("persist");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(store.close()).expect("close");
        drop(store);
        c
    }

    /// `open` again, past sled's lock of the previous handle (released by a background thread
    /// shortly after the handle goes; a new process never waits).
    fn reopen(c: &Config) -> Result<Store, DataDirError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match open(c) {
                Err(DataDirError::Store { source, .. })
                    if std::time::Instant::now() < deadline
                        && source.to_string().contains("lock") =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => return r,
            }
        }
    }

    fn damaged_reason(r: Result<Store, DataDirError>, dir: &Path) -> String {
        match r {
            Err(e @ DataDirError::Damaged { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&dir.display().to_string()), "{msg}");
                assert!(msg.contains("--recover-from-peers"), "{msg}");
                msg
            }
            Err(e) => panic!("expected Damaged, got {e}"),
            Ok(s) => panic!(
                "a damaged data_dir opened with {} entries",
                s.tables_info()[0].used
            ),
        }
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("ls") {
            let e = e.expect("entry");
            let dest = to.join(e.file_name());
            if e.file_type().expect("type").is_dir() {
                copy_dir(&e.path(), &dest);
            } else {
                std::fs::copy(e.path(), dest).expect("copy");
            }
        }
    }

    #[test]
    fn a_truncated_db_is_a_typed_error_not_a_panic() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let c = filled(tmp.path());
        let pristine = tmp.path().join("pristine");
        copy_dir(&c.data_dir, &pristine);
        // Cut at a half (as found in the field), a quarter and three quarters. Depending on
        // where sled's last flush left its segments, it reads a cut as a crash's torn tail and
        // opens the prefix before it (which the peers then complete, as after a kill -9), or
        // panics, which `open` must contain (a panic here fails the test). The flipped-bytes
        // test makes sled panic every time.
        for (num, den) in [(1, 2), (1, 4), (3, 4)] {
            std::fs::remove_dir_all(&c.data_dir).expect("rm");
            copy_dir(&pristine, &c.data_dir);
            let db = c.data_dir.join("db");
            let len = std::fs::metadata(&db).expect("db").len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&db)
                .and_then(|f| f.set_len(len * num / den))
                .expect("truncate");
            match reopen(&c) {
                Ok(store) => {
                    let used = store.tables_info()[0].used;
                    assert!(used < 30_000, "a cut db opened with every entry");
                    println!("cut at {num}/{den}: sled opened a prefix of {used} entries");
                }
                r => {
                    let msg = damaged_reason(r, &c.data_dir);
                    println!("cut at {num}/{den}: {msg}");
                }
            }
        }
        // The way out: moved aside beside it, an empty store in its place.
        let store = reopen(&config(tmp.path(), true)).expect("recovered");
        let used = store.tables_info()[0].used;
        let aside: Vec<String> = std::fs::read_dir(tmp.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("data.damaged-"))
            .collect();
        // The last cut may have been one sled opens: then nothing is moved.
        if aside.is_empty() {
            assert!(used > 0);
        } else {
            assert_eq!(used, 0);
            assert_eq!(aside.len(), 1, "{aside:?}");
            assert!(tmp.path().join(&aside[0]).join("db").is_file());
        }
    }

    #[test]
    fn flipped_bytes_are_a_typed_error_not_a_panic() {
        // In the head of `db` sled panics; in `conf` it reports corruption (without a path).
        for (file, at) in [("db", 0..64), ("conf", 8..20)] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let c = filled(tmp.path());
            let path = c.data_dir.join(file);
            let mut bytes = std::fs::read(&path).expect("read");
            for b in &mut bytes[at] {
                *b ^= 0x5a;
            }
            std::fs::write(&path, &bytes).expect("write");
            let msg = damaged_reason(reopen(&c), &c.data_dir);
            println!("{file}: {msg}");
            if file == "db" {
                assert!(msg.contains("sled gave up reading it"), "{msg}");
            }
        }
    }

    #[test]
    fn a_healthy_data_dir_is_kept_by_recover_from_peers() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let c = filled(tmp.path());
        let store = reopen(&config(tmp.path(), true)).expect("open");
        assert_eq!(store.tables_info()[0].used, 30_000);
        assert!(c.data_dir.join("db").is_file());
    }

    #[test]
    fn content_moves_inside_when_the_dir_cannot_be_renamed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        std::fs::create_dir_all(dir.join("blobs")).expect("mkdir");
        std::fs::write(dir.join("db"), b"x").expect("write");
        std::fs::create_dir(dir.join("damaged-1")).expect("mkdir");
        let inside = move_inside(&dir, 1).expect("moved");
        assert_eq!(inside, dir.join("damaged-1-1"));
        assert!(inside.join("db").is_file() && inside.join("blobs").is_dir());
        assert!(!dir.join("db").exists() && !dir.join("blobs").exists());
        assert!(
            dir.join("damaged-1").is_dir(),
            "an earlier one stays where it is"
        );
        // sled opens the emptied directory as a new store beside the moved content.
        let c = config(tmp.path(), false);
        let store = reopen(&c).expect("open");
        assert_eq!(store.tables_info()[0].used, 0);
    }
}
