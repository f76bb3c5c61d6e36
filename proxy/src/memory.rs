//! Giving memory that connections freed back to the system once a worker goes quiet.
//!
//! An allocator keeps freed pages for reuse and returns them to the system only as it
//! works: a worker that served 2,000 connections and then went quiet kept about half of
//! what their parked buffers had freed (`examples/bench/conn_memory.py`), because
//! nothing ran on it to let the allocator tidy up. A connection that parks or closes asks
//! for a release on its worker; the release waits until the worker has started no
//! request for [`QUIET`], so a busy worker never pays for it, and then calls the hook
//! the binary registered for its allocator ([`set_release`]).

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::Duration;

/// How long a worker must start no request before its freed memory is released.
pub const QUIET: Duration = Duration::from_secs(1);

/// What releases the calling thread's freed memory: the binary's allocator's.
static RELEASE: OnceLock<fn()> = OnceLock::new();

thread_local! {
    /// Requests started on this thread, to tell a quiet worker from a busy one.
    static STARTED: Cell<u64> = const { Cell::new(0) };
    /// A release is already waiting for this thread to go quiet.
    static PENDING: Cell<bool> = const { Cell::new(false) };
}

/// Registers `release`, which gives the calling thread's freed memory back to the
/// system; called by the binary, which chose the allocator. Only the first one counts.
pub fn set_release(release: fn()) {
    let _ = RELEASE.set(release);
}

/// Counts a request started on this thread.
#[inline]
pub(crate) fn request_started() {
    STARTED.with(|n| n.set(n.get().wrapping_add(1)));
}

/// Asks for this thread's freed memory to be released once it has started no request
/// for [`QUIET`]; one release waits per thread, however many ask.
///
/// Must run on a current-thread runtime (every worker's), so that the release runs on
/// the thread whose memory it is.
pub(crate) fn release_when_quiet() {
    let Some(&release) = RELEASE.get() else {
        return;
    };
    if PENDING.with(|p| p.replace(true)) {
        return;
    }
    // A connection dropped as its runtime shuts down has nothing left to release into.
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        PENDING.with(|p| p.set(false));
        return;
    };
    runtime.spawn(async move {
        loop {
            let seen = STARTED.with(Cell::get);
            tokio::time::sleep(QUIET).await;
            if STARTED.with(Cell::get) == seen {
                break;
            }
        }
        PENDING.with(|p| p.set(false));
        release();
    });
}

/// Asks for a release (as [`release_when_quiet`]) when dropped: held by a task whose
/// end frees what it held (a connection's, however it ends).
pub(crate) struct ReleaseOnDrop;

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        release_when_quiet();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        // Per thread: other tests of this binary may release on their own threads once
        // the hook is set.
        static RELEASED: Cell<usize> = const { Cell::new(0) };
    }

    fn count_release() {
        RELEASED.with(|n| n.set(n.get() + 1));
    }

    fn released() -> usize {
        RELEASED.with(Cell::get)
    }

    /// Many asks make one release, and it waits while requests keep starting: only a
    /// full quiet period without one lets it run, on the asking worker's thread.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn one_release_after_the_worker_goes_quiet() {
        set_release(count_release);
        for _ in 0..100 {
            release_when_quiet();
        }
        // Busy for three periods: a request every 400 ms.
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            request_started();
            assert_eq!(released(), 0, "released while busy");
        }
        tokio::time::sleep(QUIET * 2 + Duration::from_millis(10)).await;
        assert_eq!(released(), 1);
        // Nothing pending any more: a new ask (a connection's end) makes a new release.
        drop(ReleaseOnDrop);
        tokio::time::sleep(QUIET + Duration::from_millis(10)).await;
        assert_eq!(released(), 2);
    }
}
