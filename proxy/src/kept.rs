//! Route stacks a worker thread keeps between requests.
//!
//! A tower service is called through `&mut self`, so a request needs a stack of its own
//! to call: cloning the route's boxed stack costs an allocation and an atomic increment
//! (and later a decrement) for every shared piece of every layer. A stack that was made
//! ready and called is free again at once (its response future owns what it needs), so
//! the worker keeps it for its next request to the same route, which then pays neither.
//! A stack whose readiness is still pending stays with its request, and the next one
//! clones as before.
//!
//! Kept stacks belong to one policy snapshot: the first request that sees another
//! snapshot drops them all. Until then a kept stack lives on like one held by a request
//! still in flight, which every layer already allows.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

use crate::policy::PolicySnapshot;
use crate::stack::{RouteEntry, RouteService};

/// At most this many stacks per worker thread: a sidecar's busy routes are few.
const MAX_KEPT: usize = 16;

/// Stacks kept for the routes (`entry`, by address) of one snapshot (`owner`).
struct Kept<O, S> {
    /// Holds the snapshot's allocation, so no later snapshot can sit at its address and
    /// be taken for it (nor, inside it, a new route for an old one). Taking and keeping
    /// for the same snapshot touch no reference count.
    owner: Weak<O>,
    slots: Vec<(usize, S)>,
}

impl<O, S> Kept<O, S> {
    const fn new() -> Self {
        Self {
            owner: Weak::new(),
            slots: Vec::new(),
        }
    }

    fn owned_by(&self, owner: &Arc<O>) -> bool {
        std::ptr::eq(self.owner.as_ptr(), Arc::as_ptr(owner))
    }

    /// The stack kept for `entry` of `owner`, if any. Stacks of another snapshot are
    /// handed out in `stale`, for the caller to drop outside any borrow.
    fn take(&mut self, owner: &Arc<O>, entry: usize, stale: &mut Vec<(usize, S)>) -> Option<S> {
        if !self.owned_by(owner) {
            *stale = std::mem::take(&mut self.slots);
            return None;
        }
        let i = self.slots.iter().rposition(|s| s.0 == entry)?;
        Some(self.slots.swap_remove(i).1)
    }

    /// Keeps `svc` for `entry` of `owner`; returns what made room (the oldest stack) or
    /// what no longer belongs (every stack of another snapshot).
    fn keep(&mut self, owner: &Arc<O>, entry: usize, svc: S) -> Vec<(usize, S)> {
        let mut out = Vec::new();
        if !self.owned_by(owner) {
            self.owner = Arc::downgrade(owner);
            out = std::mem::take(&mut self.slots);
        } else if self.slots.len() >= MAX_KEPT {
            out.push(self.slots.remove(0));
        }
        self.slots.push((entry, svc));
        out
    }
}

thread_local! {
    static KEPT: RefCell<Kept<PolicySnapshot, RouteService>> = const { RefCell::new(Kept::new()) };
}

/// A stack for one request to `entry` of `snapshot`: the one this thread kept, else a
/// clone of the route's.
pub(crate) fn take(snapshot: &Arc<PolicySnapshot>, entry: &RouteEntry) -> RouteService {
    let key = std::ptr::from_ref(entry) as usize;
    let mut stale = Vec::new();
    let kept = KEPT
        .try_with(|k| {
            k.try_borrow_mut()
                .ok()
                .and_then(|mut k| k.take(snapshot, key, &mut stale))
        })
        .ok()
        .flatten();
    drop(stale);
    kept.unwrap_or_else(|| entry.service.clone())
}

/// Gives back a stack that was made ready and called, for this thread's next request to
/// `entry` of `snapshot`.
pub(crate) fn keep(snapshot: &Arc<PolicySnapshot>, entry: &RouteEntry, svc: RouteService) {
    let key = std::ptr::from_ref(entry) as usize;
    // What made room is dropped here, after the borrow; a stack that cannot be kept (the
    // list borrowed, the thread ending) is dropped with the closure.
    let made_room = KEPT.try_with(|k| {
        k.try_borrow_mut()
            .ok()
            .map(|mut k| k.keep(snapshot, key, svc))
    });
    drop(made_room);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A stand-in stack that counts how many of it are alive.
    struct Counted(Arc<AtomicUsize>);

    impl Counted {
        fn new(alive: &Arc<AtomicUsize>) -> Self {
            alive.fetch_add(1, Ordering::Relaxed);
            Self(alive.clone())
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_kept_stack_comes_back_for_its_route_only() {
        let alive = Arc::new(AtomicUsize::new(0));
        let snapshot = Arc::new(());
        let mut kept = Kept::new();
        let mut stale = Vec::new();
        assert!(
            kept.take(&snapshot, 1, &mut stale).is_none(),
            "nothing kept yet"
        );
        assert!(kept.keep(&snapshot, 1, Counted::new(&alive)).is_empty());
        assert!(
            kept.take(&snapshot, 2, &mut stale).is_none(),
            "another route's"
        );
        let svc = kept
            .take(&snapshot, 1, &mut stale)
            .expect("kept for route 1");
        assert!(kept.take(&snapshot, 1, &mut stale).is_none(), "taken once");
        drop(svc);
        assert_eq!(alive.load(Ordering::Relaxed), 0);
        assert!(stale.is_empty());
    }

    #[test]
    fn a_new_snapshot_drops_every_stack_of_the_old_one() {
        let alive = Arc::new(AtomicUsize::new(0));
        let old = Arc::new(());
        let mut kept = Kept::new();
        kept.keep(&old, 1, Counted::new(&alive));
        kept.keep(&old, 2, Counted::new(&alive));
        let new = Arc::new(());
        let mut stale = Vec::new();
        // Route 1 of the new snapshot may sit where route 1 of the old one did.
        assert!(kept.take(&new, 1, &mut stale).is_none());
        assert_eq!(stale.len(), 2);
        drop(stale);
        assert_eq!(alive.load(Ordering::Relaxed), 0, "the old stacks are gone");
        // Keeping for the new snapshot replaces whatever the old one left.
        kept.keep(&old, 3, Counted::new(&alive));
        let replaced = kept.keep(&new, 1, Counted::new(&alive));
        assert_eq!(replaced.len(), 1);
        drop(replaced);
        assert_eq!(alive.load(Ordering::Relaxed), 1);
        let mut stale = Vec::new();
        assert!(kept.take(&new, 1, &mut stale).is_some());
    }

    #[test]
    fn a_dropped_snapshot_cannot_be_mistaken_for_a_new_one() {
        let alive = Arc::new(AtomicUsize::new(0));
        let mut kept = Kept::new();
        let old = Arc::new(0u64);
        kept.keep(&old, 1, Counted::new(&alive));
        let old_at = Arc::as_ptr(&old);
        drop(old);
        // The kept slot's weak reference holds the old allocation, so a new snapshot
        // lands elsewhere and finds nothing of the old one.
        let new = Arc::new(0u64);
        assert!(!std::ptr::eq(Arc::as_ptr(&new), old_at));
        let mut stale = Vec::new();
        assert!(kept.take(&new, 1, &mut stale).is_none());
        assert_eq!(stale.len(), 1);
    }

    #[test]
    fn at_most_max_kept_stacks_per_thread() {
        let alive = Arc::new(AtomicUsize::new(0));
        let snapshot = Arc::new(());
        let mut kept = Kept::new();
        let mut made_room = 0;
        for route in 0..MAX_KEPT + 4 {
            made_room += kept.keep(&snapshot, route, Counted::new(&alive)).len();
        }
        assert_eq!(made_room, 4);
        assert_eq!(alive.load(Ordering::Relaxed), MAX_KEPT);
        let mut stale = Vec::new();
        assert!(
            kept.take(&snapshot, 0, &mut stale).is_none(),
            "the oldest made room"
        );
        assert!(kept.take(&snapshot, MAX_KEPT + 3, &mut stale).is_some());
    }
}
