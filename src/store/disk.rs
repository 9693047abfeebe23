//! The database file as redb sees it: redb's own `FileBackend`, counting failed syncs.
//!
//! A commit that fails in its writes leaves the file as the last commit left it (redb writes
//! the header after the pages), so its requests were not applied. A commit that fails in its
//! `fsync` may have reached the disk anyway and show once the file is open again: its
//! requests must hear "may have been applied". The writer tells the two apart by this count.

use std::fs::OpenOptions;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redb::backends::FileBackend;
use redb::{DatabaseError, StorageBackend};

/// The file's backend, as an [`Opener`](super::Opener) makes it.
pub type Backend = Box<dyn StorageBackend>;

/// The file as redb's own `FileBackend`, opened as `Builder::create` opens it.
pub fn file_backend(path: &Path) -> Result<Backend, DatabaseError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(redb::StorageError::from)?;
    Ok(Box::new(FileBackend::new(file)?))
}

#[derive(Debug)]
pub struct Disk {
    inner: Backend,
    failed_syncs: Arc<AtomicU64>,
}

impl Disk {
    /// `inner`, with its failed syncs added to `failed_syncs`.
    pub fn new(inner: Backend, failed_syncs: Arc<AtomicU64>) -> Disk {
        Disk {
            inner,
            failed_syncs,
        }
    }
}

/// The methods a backend wrapping another (`self.inner`) passes through unchanged: length,
/// reads, close, and the byte-range locks by which redb keeps one process per file.
macro_rules! pass_through {
    () => {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.inner.read(offset, out)
        }
        fn close(&self) -> std::io::Result<()> {
            self.inner.close()
        }
        fn try_lock_range(
            &self,
            s: std::ops::Bound<u64>,
            e: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.inner.try_lock_range(s, e)
        }
        fn try_lock_shared_range(
            &self,
            s: std::ops::Bound<u64>,
            e: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.inner.try_lock_shared_range(s, e)
        }
        fn lock_range(
            &self,
            s: std::ops::Bound<u64>,
            e: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.inner.lock_range(s, e)
        }
        fn lock_shared_range(
            &self,
            s: std::ops::Bound<u64>,
            e: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.inner.lock_shared_range(s, e)
        }
        fn unlock_range(
            &self,
            s: std::ops::Bound<u64>,
            e: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.inner.unlock_range(s, e)
        }
        fn query_lock_range(
            &self,
            s: std::ops::Bound<u64>,
            e: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.inner.query_lock_range(s, e)
        }
    };
}
impl StorageBackend for Disk {
    pass_through!();
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        let synced = self.inner.sync_data();
        if synced.is_err() {
            self.failed_syncs.fetch_add(1, Ordering::SeqCst);
        }
        synced
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.inner.write(offset, data)
    }
}

/// A backend with faults on demand, for tests and drills: while `full` is set its writes and
/// growth fail with ENOSPC (a full disk); while `no_growth` is set only growing the file
/// fails so (a full disk under a file with free pages inside); while `bad_sync` is set its
/// syncs fail with EIO without syncing (a failing device: the data may still reach the disk).
#[derive(Debug)]
pub struct Faulty {
    pub inner: Backend,
    pub faults: Faults,
}

/// The switches of [`Faulty`] files; clones share them.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    pub full: Arc<std::sync::atomic::AtomicBool>,
    pub no_growth: Arc<std::sync::atomic::AtomicBool>,
    pub bad_sync: Arc<std::sync::atomic::AtomicBool>,
}

/// A full disk's error (ENOSPC), as the kernel reports it.
fn no_space() -> io::Error {
    io::Error::from_raw_os_error(28)
}

impl Faulty {
    fn check(&self) -> io::Result<()> {
        if self.faults.full.load(Ordering::SeqCst) {
            Err(no_space())
        } else {
            Ok(())
        }
    }
}

impl StorageBackend for Faulty {
    pass_through!();
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check()?;
        if self.faults.no_growth.load(Ordering::SeqCst) && len > self.inner.len()? {
            return Err(no_space());
        }
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        if self.faults.bad_sync.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check()?;
        self.inner.write(offset, data)
    }
}

/// An [`Opener`](super::Opener) of [`Faulty`] files sharing the switches of `faults`.
pub fn faulty_opener(faults: Faults) -> super::Opener {
    Arc::new(move |path: &Path| -> Result<Backend, DatabaseError> {
        Ok(Box::new(Faulty {
            inner: file_backend(path)?,
            faults: faults.clone(),
        }))
    })
}
