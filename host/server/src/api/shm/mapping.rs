//! A registered region's mapping, and the guard that keeps a client's truncation from
//! killing the server.
//!
//! A region is mapped once, when it is registered: reading an input or writing an
//! output is then one memory copy (`pread`/`pwrite` went through tmpfs a page at a time
//! and cost about twice a copy). A mapping faults (SIGBUS) wherever its object no longer
//! reaches, so a client that shrinks its object after registering it would otherwise
//! kill the server. The SIGBUS handler here looks the faulting address up among the live
//! mappings, puts private zero pages in place of that mapping so the copy under way
//! finishes, and marks the mapping faulted: the request then fails with an error, and
//! the region stays unusable until it is registered again. Any other SIGBUS goes to the
//! handler that was installed before (wasmtime's, which turns faults in Wasm code into
//! traps), or to the default action.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Mappings alive at once: registered regions, plus unregistered ones that requests in
/// flight still hold.
const SLOTS: usize = 1024;

/// Where one live mapping lies, for the signal handler (which may only use atomics).
struct Slot {
    taken: AtomicBool,
    /// 0 while the slot describes no mapping.
    start: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // a template for the array below
const FREE: Slot = Slot {
    taken: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];

/// SIGBUS's disposition before ours, to pass on the faults that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
/// Whether installing the handler worked (once per process).
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

/// Why a copy did not happen in full.
#[derive(Debug)]
pub enum Fault {
    /// The object no longer covers the mapping (it was truncated); the copy saw zeros.
    Truncated,
    /// The region was mapped read-only.
    ReadOnly,
}

/// One region, mapped shared; its pages are the client's object's pages.
pub struct Mapping {
    base: *mut u8,
    mapped_len: usize,
    /// Where the region starts in the mapping (its offset within a page).
    lead: usize,
    len: usize,
    writable: bool,
    slot: usize,
    /// Whether the fault was logged already (once per mapping).
    reported: AtomicBool,
}

// SAFETY: the mapping is plain shared memory owned by this value; every access copies
// through raw pointers within bounds checked against `len`.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes at `offset` of `file`, read-write or read-only.
    pub fn new(
        file: &std::fs::File,
        offset: u64,
        len: u64,
        writable: bool,
    ) -> Result<Mapping, String> {
        install_guard()?;
        let page = page_size();
        let lead = (offset % page as u64) as usize;
        let len = usize::try_from(len).map_err(|_| "the region is too large to map".to_string())?;
        let mapped_len = len
            .checked_add(lead)
            .ok_or_else(|| "the region is too large to map".to_string())?;
        let aligned = libc::off_t::try_from(offset - lead as u64)
            .map_err(|_| "the offset is too large".to_string())?;
        let slot = take_slot().ok_or_else(|| {
            format!("{SLOTS} shared memory mappings are in use, the server's limit")
        })?;
        let protection = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of the file; the kernel picks the address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                protection,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                aligned,
            )
        };
        if base == libc::MAP_FAILED {
            let error = std::io::Error::last_os_error();
            TABLE[slot].taken.store(false, Ordering::Release);
            return Err(format!("cannot map it: {error}"));
        }
        let entry = &TABLE[slot];
        entry.faulted.store(false, Ordering::Release);
        entry.len.store(mapped_len, Ordering::Release);
        entry.start.store(base as usize, Ordering::Release);
        Ok(Mapping {
            base: base.cast(),
            mapped_len,
            lead,
            len,
            writable,
            slot,
            reported: AtomicBool::new(false),
        })
    }

    /// Whether the object was found truncated under this mapping.
    pub fn faulted(&self) -> bool {
        TABLE[self.slot].faulted.load(Ordering::Acquire)
    }

    /// True the first time it is asked after a fault: the fault is logged once.
    pub fn first_report(&self) -> bool {
        self.faulted() && !self.reported.swap(true, Ordering::AcqRel)
    }

    fn check(&self, at: usize, len: usize) -> *mut u8 {
        assert!(at.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: within the mapping, by the assertion.
        unsafe { self.base.add(self.lead + at) }
    }

    /// A copy of `len` bytes at `at` (relative to the region).
    pub fn read(&self, at: usize, len: usize) -> Result<Vec<u8>, Fault> {
        if self.faulted() {
            return Err(Fault::Truncated);
        }
        let source = self.check(at, len);
        let mut data = Vec::<u8>::with_capacity(len);
        // SAFETY: `source..source+len` lies in the mapping (checked) and the Vec has room
        // for `len` bytes. Raw copies, no references: the client may write concurrently.
        unsafe {
            std::ptr::copy_nonoverlapping(source, data.as_mut_ptr(), len);
            data.set_len(len);
        }
        if self.faulted() {
            return Err(Fault::Truncated);
        }
        Ok(data)
    }

    /// Copies `data` to `at` (relative to the region).
    pub fn write(&self, at: usize, data: &[u8]) -> Result<(), Fault> {
        if !self.writable {
            return Err(Fault::ReadOnly);
        }
        if self.faulted() {
            return Err(Fault::Truncated);
        }
        let target = self.check(at, data.len());
        // SAFETY: the target range lies in the writable mapping (checked).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), target, data.len()) };
        if self.faulted() {
            return Err(Fault::Truncated);
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let entry = &TABLE[self.slot];
        entry.start.store(0, Ordering::Release);
        entry.len.store(0, Ordering::Release);
        // SAFETY: our own mapping (or the zero pages that replaced it), unused from now on.
        unsafe { libc::munmap(self.base.cast(), self.mapped_len) };
        entry.taken.store(false, Ordering::Release);
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .unwrap_or(4096)
}

fn take_slot() -> Option<usize> {
    TABLE.iter().position(|slot| {
        slot.taken
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    })
}

fn install_guard() -> Result<(), String> {
    INSTALLED
        .get_or_init(|| {
            // SAFETY: installs a handler that only touches atomics and calls mmap, both
            // safe in a signal handler; the previous disposition is kept to chain to.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigbus as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
                libc::sigemptyset(&mut action.sa_mask);
                let mut previous: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGBUS, &action, &mut previous) != 0 {
                    return Err(format!(
                        "cannot install the SIGBUS guard: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                let _ = PREVIOUS.set(previous);
            }
            Ok(())
        })
        .clone()
}

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let address = unsafe { (*info).si_addr() } as usize;
    for entry in TABLE.iter() {
        let start = entry.start.load(Ordering::Acquire);
        let len = entry.len.load(Ordering::Acquire);
        if start == 0 || address < start || address - start >= len {
            continue;
        }
        // SAFETY: errno is thread-local; kept so the interrupted code sees its own.
        let errno = unsafe { *libc::__errno_location() };
        // SAFETY: replaces exactly our own mapping with private zero pages.
        let replaced = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = errno };
        if replaced != libc::MAP_FAILED {
            entry.faulted.store(true, Ordering::Release);
            return; // the faulting copy resumes, now on zero pages
        }
        break;
    }
    pass_on(signal, info, context);
}

/// Hands a SIGBUS that is not ours to the disposition before ours.
fn pass_on(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let Some(previous) = PREVIOUS.get() else {
        return reset_to_default(signal);
    };
    if previous.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: a SA_SIGINFO handler takes these three arguments.
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(previous.sa_sigaction) };
        handler(signal, info, context);
    } else if previous.sa_sigaction == libc::SIG_DFL || previous.sa_sigaction == libc::SIG_IGN {
        reset_to_default(signal);
    } else {
        // SAFETY: a plain handler takes the signal number.
        let handler: extern "C" fn(libc::c_int) =
            unsafe { std::mem::transmute(previous.sa_sigaction) };
        handler(signal);
    }
}

/// Puts the default action back: returning re-runs the faulting instruction, which then
/// ends the process as SIGBUS always did.
fn reset_to_default(signal: libc::c_int) {
    // SAFETY: sigaction is async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(signal, &action, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file in /dev/shm, removed on drop.
    struct Object(std::path::PathBuf, std::fs::File);

    impl Object {
        fn new(len: u64) -> Object {
            let path = std::path::Path::new("/dev/shm").join(format!(
                "wisp-mapping-test-{}-{}",
                std::process::id(),
                fastrand::u64(..)
            ));
            let file = std::fs::File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .unwrap();
            file.set_len(len).unwrap();
            Object(path, file)
        }
    }

    impl Drop for Object {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn a_mapping_reads_and_writes_its_object_at_an_unaligned_offset() {
        let object = Object::new(3 * 4096);
        let mapping = Mapping::new(&object.1, 4100, 100, true).unwrap();
        mapping.write(10, b"wisp").unwrap();
        assert_eq!(&mapping.read(8, 8).unwrap(), b"\0\0wisp\0\0");
        use std::os::unix::fs::FileExt;
        let mut seen = [0u8; 4];
        object.1.read_exact_at(&mut seen, 4110).unwrap();
        assert_eq!(&seen, b"wisp");
        let read_only = Mapping::new(&object.1, 0, 8, false).unwrap();
        assert!(matches!(read_only.write(0, b"x"), Err(Fault::ReadOnly)));
    }

    #[test]
    fn a_truncation_under_a_mapping_faults_the_copy_not_the_process() {
        // wasmtime's own SIGBUS handler is there too, as in the server.
        #[cfg(feature = "wasm")]
        let _engine = wisp_backend_wasm::WasmRuntime::new(None).unwrap();
        let object = Object::new(4 * 4096);
        let mapping = Mapping::new(&object.1, 0, 4 * 4096, true).unwrap();
        assert_eq!(mapping.read(0, 4 * 4096).unwrap().len(), 4 * 4096);
        object.1.set_len(0).unwrap();
        // The pages are gone: without the guard this copy would end the test process.
        assert!(matches!(mapping.read(4096, 4096), Err(Fault::Truncated)));
        assert!(mapping.faulted());
        assert!(matches!(mapping.write(0, &[1; 16]), Err(Fault::Truncated)));
        // Other mappings are unaffected, and a dropped mapping frees its slot.
        let other = Object::new(4096);
        let fine = Mapping::new(&other.1, 0, 4096, true).unwrap();
        fine.write(0, b"ok").unwrap();
        assert_eq!(&fine.read(0, 2).unwrap(), b"ok");
        let slot = mapping.slot;
        drop(mapping);
        assert!(!TABLE[slot].taken.load(Ordering::Acquire));
    }
}
