//! The tag and alias changes already counted, by `eventID`, so that an event given twice (a
//! trail's S3 file and a `lookup-events` page of the same hours, two overlapping pages, a file
//! passed twice) is judged and counted once. CloudTrail gives every event a GUID of its own
//! (shared research note: `eventID` is the de-duplication key).
//!
//! Only the events that reach judging are remembered (tag and alias changes, about 1% of a
//! trail), as a 128-bit hash of the ID keyed afresh on each run (two SipHash keys), so no input
//! can be made to collide two IDs, and at most [`MAX_REMEMBERED`] of them: at most 27 MiB,
//! within replay's 64 MiB however large the input. Past
//! that, a new ID is not remembered and its event is counted as not de-duplicated.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

/// The most event IDs one replay remembers: a table of 2^20 slots of 17 bytes holds 917,504
/// (seven eighths), about 18 MiB, and 27 MiB while it grows from half that.
pub const MAX_REMEMBERED: usize = 900_000;

/// What [`Seen::first`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The first time this ID comes: judge the event.
    First,
    /// The ID came before: skip the event.
    Again,
    /// Not seen, and not remembered either (the bound is reached): judge it, counted apart.
    Unremembered,
}

/// The IDs seen, shared by the threads that read files.
#[derive(Debug)]
pub struct Seen {
    keys: (RandomState, RandomState),
    ids: Mutex<HashSet<u128>>,
    max: usize,
}

impl Default for Seen {
    fn default() -> Self {
        Seen::with_bound(MAX_REMEMBERED)
    }
}

impl Seen {
    /// A set that remembers at most `max` IDs.
    pub fn with_bound(max: usize) -> Seen {
        Seen {
            keys: (RandomState::new(), RandomState::new()),
            ids: Mutex::new(HashSet::new()),
            max,
        }
    }

    /// Whether `id` comes for the first time, and remembers it.
    pub fn first(&self, id: &str) -> Claim {
        let hash =
            u128::from(self.keys.0.hash_one(id)) << 64 | u128::from(self.keys.1.hash_one(id));
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if ids.contains(&hash) {
            Claim::Again
        } else if ids.len() >= self.max {
            Claim::Unremembered
        } else {
            ids.insert(hash);
            Claim::First
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_first_once_and_the_bound_holds() {
        let seen = Seen::with_bound(3);
        assert_eq!(seen.first("a"), Claim::First);
        assert_eq!(seen.first("a"), Claim::Again);
        assert_eq!(seen.first("b"), Claim::First);
        assert_eq!(seen.first("c"), Claim::First);
        // Full: a new ID is not remembered (each time), an old one is still known.
        assert_eq!(seen.first("d"), Claim::Unremembered);
        assert_eq!(seen.first("d"), Claim::Unremembered);
        assert_eq!(seen.first("b"), Claim::Again);
        // IDs are compared whole: case and a prefix make another ID.
        let seen = Seen::default();
        assert_eq!(seen.first("0a091b9b"), Claim::First);
        assert_eq!(seen.first("0A091B9B"), Claim::First);
        assert_eq!(seen.first("0a091b9"), Claim::First);
    }
}
