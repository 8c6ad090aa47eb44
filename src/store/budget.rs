//! The byte budget: which blobs are on disk, how big, when each was last
//! read, and which are pinned by a fill or a reader. Picks least recently
//! used, unpinned blobs to evict once usage passes the high watermark,
//! until it is under the low one. Pure bookkeeping: the caller deletes.

use crate::digest::Digest;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_size: u64,
    pub high: u64,
    pub low: u64,
}

#[derive(Debug, Default)]
struct State {
    /// digest → (size, last access in unix milliseconds)
    blobs: HashMap<Digest, (u64, u64)>,
    total: u64,
    pins: HashMap<Digest, usize>,
    /// Blobs whose last access changed since the index last heard of it.
    dirty: HashSet<Digest>,
}

#[derive(Debug)]
pub struct Budget {
    limits: Limits,
    state: Mutex<State>,
}

/// Keeps a blob from eviction while alive.
#[derive(Debug)]
pub struct Pin {
    budget: Arc<Budget>,
    digest: Digest,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut state = self.budget.state.lock().expect("budget lock");
        if let Some(count) = state.pins.get_mut(&self.digest) {
            *count -= 1;
            if *count == 0 {
                state.pins.remove(&self.digest);
            }
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Budget {
    /// `blobs`: what is on disk, with size and last access.
    pub fn new(limits: Limits, blobs: impl IntoIterator<Item = (Digest, u64, u64)>) -> Budget {
        let mut state = State::default();
        for (digest, size, last_access) in blobs {
            state.total += size;
            state.blobs.insert(digest, (size, last_access));
        }
        Budget {
            limits,
            state: Mutex::new(state),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn pin(self: &Arc<Self>, digest: &Digest) -> Pin {
        let mut state = self.state.lock().expect("budget lock");
        *state.pins.entry(digest.clone()).or_default() += 1;
        Pin {
            budget: self.clone(),
            digest: digest.clone(),
        }
    }

    pub fn is_pinned(&self, digest: &Digest) -> bool {
        self.state
            .lock()
            .expect("budget lock")
            .pins
            .contains_key(digest)
    }

    /// Records a read. Cheap: memory only; [`Budget::take_dirty`] batches it to disk.
    pub fn touch(&self, digest: &Digest) {
        let mut state = self.state.lock().expect("budget lock");
        let now = now_ms();
        if let Some(entry) = state.blobs.get_mut(digest) {
            if entry.1 != now {
                entry.1 = now;
                state.dirty.insert(digest.clone());
            }
        }
    }

    pub fn add(&self, digest: &Digest, size: u64) {
        let mut state = self.state.lock().expect("budget lock");
        if let Some((old, _)) = state.blobs.insert(digest.clone(), (size, now_ms())) {
            state.total -= old;
        }
        state.total += size;
    }

    pub fn remove(&self, digest: &Digest) {
        let mut state = self.state.lock().expect("budget lock");
        if let Some((size, _)) = state.blobs.remove(digest) {
            state.total -= size;
        }
        state.dirty.remove(digest);
    }

    /// (blob count, bytes)
    pub fn usage(&self) -> (u64, u64) {
        let state = self.state.lock().expect("budget lock");
        (state.blobs.len() as u64, state.total)
    }

    /// Whether a blob of `size` may be kept at all.
    pub fn fits(&self, size: u64) -> bool {
        size <= self.limits.max_size
    }

    /// Blobs to evict now, oldest first: none while usage is at or under
    /// the high watermark, else enough unpinned ones to reach the low one.
    pub fn victims(&self) -> Vec<(Digest, u64)> {
        let state = self.state.lock().expect("budget lock");
        if state.total <= self.limits.high {
            return Vec::new();
        }
        let mut candidates: Vec<(&Digest, u64, u64)> = state
            .blobs
            .iter()
            .filter(|(d, _)| !state.pins.contains_key(*d))
            .map(|(d, (size, access))| (d, *size, *access))
            .collect();
        candidates.sort_by_key(|(d, _, access)| (*access, (*d).clone()));
        let mut total = state.total;
        let mut out = Vec::new();
        for (digest, size, _) in candidates {
            if total <= self.limits.low {
                break;
            }
            total -= size;
            out.push((digest.clone(), size));
        }
        out
    }

    /// Last-access times changed since the previous call.
    pub fn take_dirty(&self) -> Vec<(Digest, u64)> {
        let mut state = self.state.lock().expect("budget lock");
        let dirty = std::mem::take(&mut state.dirty);
        dirty
            .into_iter()
            .filter_map(|d| state.blobs.get(&d).map(|(_, access)| (d.clone(), *access)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::sha256_of(&[n])
    }

    fn budget(blobs: &[(u8, u64, u64)]) -> Arc<Budget> {
        Arc::new(Budget::new(
            Limits {
                max_size: 100,
                high: 90,
                low: 80,
            },
            blobs
                .iter()
                .map(|(n, size, access)| (d(*n), *size, *access)),
        ))
    }

    #[test]
    fn nothing_to_evict_under_the_high_watermark() {
        assert!(budget(&[(1, 50, 1), (2, 40, 2)]).victims().is_empty());
    }

    #[test]
    fn evicts_least_recently_used_down_to_the_low_watermark() {
        let b = budget(&[(1, 30, 5), (2, 30, 1), (3, 35, 3)]);
        assert_eq!(b.usage(), (3, 95));
        let victims: Vec<_> = b.victims().into_iter().map(|(d, _)| d).collect();
        assert_eq!(victims, vec![d(2)]);
        b.remove(&d(2));
        assert_eq!(b.usage(), (2, 65));
    }

    #[test]
    fn pinned_blobs_are_never_victims() {
        let b = budget(&[(1, 50, 1), (2, 50, 2)]);
        let pin = b.pin(&d(1));
        let second = b.pin(&d(1));
        drop(second);
        assert!(b.is_pinned(&d(1)));
        assert_eq!(b.victims(), vec![(d(2), 50)]);
        drop(pin);
        assert!(!b.is_pinned(&d(1)));
        assert_eq!(b.victims(), vec![(d(1), 50)]);
    }

    #[test]
    fn touches_are_batched() {
        let b = budget(&[(1, 10, 0)]);
        b.touch(&d(1));
        b.touch(&d(1));
        let dirty = b.take_dirty();
        assert_eq!(dirty.len(), 1);
        assert!(dirty[0].1 > 0);
        assert!(b.take_dirty().is_empty());
    }
}
