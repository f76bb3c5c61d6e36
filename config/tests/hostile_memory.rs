//! Refusing each hostile policy file costs little memory: the peak of live heap
//! bytes while parsing stays under 64 MiB (the injected sidecar's limit is 128 Mi),
//! where without bounds the alias fan-out alone took over 1 GB.
//!
//! Its own test binary, so the counting allocator below applies only here.

// A global allocator is an `unsafe impl`; it only counts and forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use sluice_config::parse_policies;

mod hostile;

/// Counts live bytes and the highest count since the last reset.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`; the counters are atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let grow = new_size - layout.size();
                let live = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One measurement at a time: the test harness runs tests on several threads.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const MIB: usize = 1024 * 1024;

/// Peak bytes allocated beyond those live before, while refusing `text`.
fn peak_while_refusing(name: &str, text: &str) -> usize {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let refused = parse_policies(name, text).is_err();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert!(refused, "{name} was accepted");
    peak
}

#[test]
fn refusing_each_hostile_file_stays_under_64_mib() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/broken");
    let mut cases = hostile::cases()
        .into_iter()
        .map(|(name, text, _)| (name.to_string(), text))
        .collect::<Vec<_>>();
    for name in [
        "61-alias-expansion.yaml",
        "62-recursive-alias.yaml",
        "63-nested-too-deep.yaml",
        "64-routes-repeated-by-alias.yaml",
    ] {
        cases.push((
            name.to_string(),
            std::fs::read_to_string(corpus.join(name)).unwrap(),
        ));
    }
    let mut report = Vec::new();
    for (name, text) in &cases {
        let peak = peak_while_refusing(name, text);
        report.push(format!("{name}: {:.2} MiB", peak as f64 / MIB as f64));
        assert!(
            peak < 64 * MIB,
            "{name}: peak {peak} bytes\n{}",
            report.join("\n")
        );
    }
    // The figures, for anyone tuning the limits (`--nocapture`).
    eprintln!("{}", report.join("\n"));
}
