//! The randomness splits and balancers share: one per-thread generator on the hot
//! path, a seeded one for reproducible tests.

use std::cell::Cell;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where splits and balancers get their randomness.
///
/// The default draws from a per-thread wyrand generator (a few instructions, no shared
/// state). Tests inject [`RandomSource::seeded`] for reproducible sequences.
#[derive(Clone, Debug, Default)]
pub enum RandomSource {
    /// A fast per-thread generator seeded from the OS.
    #[default]
    ThreadLocal,
    /// A deterministic generator shared by its clones (splitmix64 over an atomic counter).
    Seeded(Arc<AtomicU64>),
}

thread_local! {
    static WYRAND: Cell<u64> = Cell::new(RandomState::new().hash_one(0x5eed_u64));
}

const SPLITMIX_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

impl RandomSource {
    /// A deterministic source starting from `seed`.
    pub fn seeded(seed: u64) -> Self {
        RandomSource::Seeded(Arc::new(AtomicU64::new(seed)))
    }

    /// The next 64 random bits.
    pub fn next_u64(&self) -> u64 {
        match self {
            RandomSource::ThreadLocal => WYRAND.with(|s| {
                let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
                s.set(x);
                let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
                ((t >> 64) as u64) ^ (t as u64)
            }),
            RandomSource::Seeded(state) => {
                let mut z = state
                    .fetch_add(SPLITMIX_GAMMA, Ordering::Relaxed)
                    .wrapping_add(SPLITMIX_GAMMA);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            }
        }
    }

    /// A uniform integer in `[0, n)` (`n > 0`), by multiply-shift rather than a division.
    pub fn below(&self, n: u32) -> u32 {
        ((u64::from(self.next_u64() as u32) * u64::from(n)) >> 32) as u32
    }

    /// A uniform point in `[0, 10000)`, the unit a weighted split walks.
    pub fn point(&self) -> u32 {
        self.below(sluice_config::STICKY_POINTS)
    }
}
