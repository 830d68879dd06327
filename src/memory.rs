//! The process's heap: the global allocator the binaries install, and peak-memory measurement
//! for the benchmarks.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (the same index in its v2 and v3
/// headers); libmimalloc-sys names no constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes the allocator keep memory that was freed instead of returning it to the OS after a
/// delay. A training step frees and reallocates the same large buffers every step; returning
/// them meant page faults and page zeroing on each step (measured: `bench train` at 3,110–3,160
/// tokens/s with this, 2,490–2,860 with mimalloc's default delays). The process keeps its peak
/// heap, as PyTorch's caching allocator does. Call it first thing in `main`.
pub fn keep_freed_memory() {
    // SAFETY: sets one integer option; mimalloc reads it at its next purge decision.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// mimalloc, counting live bytes and their peak (the `polyburn` binary installs it).
///
/// mimalloc rather than glibc's malloc: glibc serves every buffer above 32 MiB with a fresh
/// `mmap` and returns it with `munmap` on free, so each training step page-faulted and
/// zeroed its large activations and gradients again (half the time of a diversity
/// forward + backward at G = 4096 was kernel page-fault handling); mimalloc reuses them.
pub struct PeakAlloc;

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { mimalloc::MiMalloc.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            grow(new_size);
        }
        p
    }
}

fn grow(bytes: usize) {
    INSTALLED.store(true, Ordering::Relaxed);
    let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

/// Runs `f`, returning its result and the peak of live heap bytes above the starting level
/// (`None` when the tracking allocator is not installed, e.g. in library tests).
pub fn measure_peak<T>(f: impl FnOnce() -> T) -> (T, Option<usize>) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    (out, INSTALLED.load(Ordering::Relaxed).then_some(peak))
}

