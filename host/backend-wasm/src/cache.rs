//! Compiled components on disk, so each component compiles once: a model's load, a
//! reload and a restart reuse the machine code of an identical component compiled by the
//! same engine.
//!
//! Entries are named by a SHA-256 of the component's bytes and of the engine's
//! compatibility hash (wasmtime version, compiler settings, CPU features), written to a
//! temporary file and renamed into place (a reader never sees half an entry), and read
//! into memory before use (no mapping that another process could truncate under us).
//! wasmtime also checks an entry's header when it deserializes one; an entry it refuses
//! is compiled again and replaced. Loading an entry runs the machine code in it, so the
//! folder must be writable by this user alone: a folder that group or others may write,
//! or that another user owns, is refused. The oldest entries (by last use) go when the
//! folder passes its size budget.

use sha2::{Digest, Sha256};
use std::hash::Hash;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;
use wasmtime::component::Component;
use wasmtime::Engine;
use wisp_core::error::{Error, Result};

const EXTENSION: &str = "cwasm";

/// Where a component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Compiled,
    Cached,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Compiled => "compiled",
            Origin::Cached => "cached",
        }
    }
}

/// A folder of compiled components.
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: PathBuf,
    max_bytes: u64,
}

impl CompileCache {
    /// Opens (creating, private to this user) the cache folder `dir`, which keeps at
    /// most `max_bytes` of entries.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<CompileCache> {
        let dir = dir.into();
        let fail = |what: String| Error::invalid(format!("Wasm cache {}: {what}", dir.display()));
        create_private(&dir).map_err(|e| fail(format!("cannot create it: {e}")))?;
        check_private(&dir).map_err(fail)?;
        Ok(CompileCache { dir, max_bytes })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The component of `wasm`: from the cache, else compiled (and stored). Failures to
    /// store are logged, not returned: the cache only saves time.
    pub fn component(&self, engine: &Engine, wasm: &[u8]) -> Result<(Component, Origin)> {
        let entry = self.entry(engine, wasm);
        if let Ok(bytes) = std::fs::read(&entry) {
            // SAFETY: the entry was written by `store` below from wasmtime's own
            // serialization, under a name that binds it to these bytes and this engine,
            // in a folder only this user may write (checked at `open`); wasmtime checks
            // its header and version again.
            match unsafe { Component::deserialize(engine, &bytes) } {
                Ok(component) => {
                    touch(&entry);
                    return Ok((component, Origin::Cached));
                }
                Err(e) => tracing::warn!(
                    entry = %entry.display(),
                    "ignoring a Wasm cache entry wasmtime refuses: {e:#}"
                ),
            }
        }
        let component = Component::new(engine, wasm)
            .map_err(|e| Error::unavailable(format!("not a valid component: {e:#}")))?;
        if let Err(e) = self.store(&entry, &component) {
            tracing::warn!(entry = %entry.display(), "cannot store a compiled component: {e}");
        }
        Ok((component, Origin::Compiled))
    }

    fn entry(&self, engine: &Engine, wasm: &[u8]) -> PathBuf {
        let mut hasher = HashInto(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        hasher.0.update((wasm.len() as u64).to_le_bytes());
        hasher.0.update(wasm);
        let digest = hasher.0.finalize();
        let name: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{name}.{EXTENSION}"))
    }

    fn store(&self, entry: &Path, component: &Component) -> std::result::Result<(), String> {
        let bytes = component.serialize().map_err(|e| format!("{e:#}"))?;
        // Unique per writer: two loads of one component may store it at once.
        static WRITES: AtomicU64 = AtomicU64::new(0);
        let temporary = entry.with_extension(format!(
            "{}-{}.tmp",
            std::process::id(),
            WRITES.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&temporary, &bytes)
            .and_then(|()| std::fs::rename(&temporary, entry))
            .map_err(|e| {
                let _ = std::fs::remove_file(&temporary);
                e.to_string()
            })?;
        self.evict();
        Ok(())
    }

    /// Removes the least recently used entries until the folder fits its budget.
    fn evict(&self) {
        let Ok(listing) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let stale = SystemTime::now() - std::time::Duration::from_secs(3600);
        let mut entries: Vec<(SystemTime, u64, PathBuf)> = listing
            .flatten()
            .filter(|e| {
                let path = e.path();
                // A writer that died between write and rename left its temporary file.
                if path.extension().is_some_and(|x| x == "tmp")
                    && e.metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t < stale)
                {
                    let _ = std::fs::remove_file(&path);
                }
                path.extension().is_some_and(|x| x == EXTENSION)
            })
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = entries.iter().map(|(_, len, _)| len).sum();
        entries.sort();
        for (_, len, path) in entries {
            if total <= self.max_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
    }
}

/// Feeds `Hash` output into a SHA-256 (stable across runs, unlike `DefaultHasher`).
struct HashInto(Sha256);

impl std::hash::Hasher for HashInto {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        unreachable!("read through the digest")
    }
}

/// Marks an entry as just used (eviction goes by modification time).
fn touch(entry: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(entry) {
        let _ = file.set_modified(SystemTime::now());
    }
}

#[cfg(unix)]
fn create_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

#[cfg(unix)]
fn check_private(dir: &Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err("not a folder".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "owned by user {}, not by this server's user {me}; the server runs code from it",
            meta.uid()
        ));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(format!(
            "writable by group or others (mode {:o}); the server runs code from it, so only its user may write it",
            meta.permissions().mode() & 0o777
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_dir: &Path) -> std::result::Result<(), String> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest component: its header, nothing else.
    const EMPTY: &[u8] = b"\0asm\x0d\0\x01\0";

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    fn entries(dir: &Path) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        found.sort();
        found
    }

    #[test]
    fn a_component_compiles_once_and_comes_back_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path().join("wasm"), 1 << 30).unwrap();
        let engine = engine();
        let (_, origin) = cache.component(&engine, EMPTY).unwrap();
        assert_eq!(origin, Origin::Compiled);
        let stored = entries(cache.dir());
        assert_eq!(stored.len(), 1, "{stored:?}");
        assert!(stored[0].to_string_lossy().ends_with(".cwasm"));
        assert_eq!(cache.component(&engine, EMPTY).unwrap().1, Origin::Cached);
        // Another engine of the same settings shares the entries.
        assert_eq!(
            cache.component(&super::tests::engine(), EMPTY).unwrap().1,
            Origin::Cached
        );
    }

    #[test]
    fn a_damaged_entry_is_compiled_again_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path(), 1 << 30).unwrap();
        let engine = engine();
        cache.component(&engine, EMPTY).unwrap();
        let entry = entries(cache.dir()).remove(0);
        let good = std::fs::read(&entry).unwrap();
        for damage in [
            &good[..good.len() / 2],
            b"not a compiled component".as_slice(),
            &[],
        ] {
            std::fs::write(&entry, damage).unwrap();
            assert_eq!(cache.component(&engine, EMPTY).unwrap().1, Origin::Compiled);
            assert_eq!(std::fs::read(&entry).unwrap(), good);
        }
        assert_eq!(entries(cache.dir()), [entry]);
    }

    #[test]
    fn invalid_bytes_fail_and_store_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path(), 1 << 30).unwrap();
        let err = cache.component(&engine(), b"\0asm garbage").err().unwrap();
        assert!(
            err.message.contains("not a valid component"),
            "{}",
            err.message
        );
        assert!(entries(cache.dir()).is_empty());
    }

    #[test]
    fn the_oldest_entries_go_past_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path(), 0).unwrap();
        let old = dir.path().join(format!("{}.{EXTENSION}", "0".repeat(64)));
        std::fs::write(&old, vec![0u8; 100]).unwrap();
        let file = std::fs::File::options().append(true).open(&old).unwrap();
        file.set_modified(SystemTime::UNIX_EPOCH).unwrap();
        cache.component(&engine(), EMPTY).unwrap();
        // A budget of 0 keeps nothing; with room for one entry the old one goes first.
        assert!(entries(cache.dir()).is_empty());
        let cache = CompileCache::open(dir.path(), 50_000).unwrap();
        std::fs::write(&old, vec![0u8; 50_000]).unwrap();
        let file = std::fs::File::options().append(true).open(&old).unwrap();
        file.set_modified(SystemTime::UNIX_EPOCH).unwrap();
        cache.component(&engine(), EMPTY).unwrap();
        let kept = entries(cache.dir());
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_ne!(kept[0], old);
    }

    #[cfg(unix)]
    #[test]
    fn a_folder_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = CompileCache::open(dir.path(), 1 << 30).unwrap_err();
        assert!(
            err.message.contains("writable by group or others"),
            "{}",
            err.message
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(CompileCache::open(dir.path(), 1 << 30).is_ok());
    }
}
