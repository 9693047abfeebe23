//! Random identifiers on the hot path: task ids (UUIDv7) and the random part of lease tokens.
//!
//! `uuid`'s own constructors ask the operating system for 16 random bytes each time, one
//! system call per id; that was 5% of server time when creating tasks in bulk. Here each
//! thread draws 1 KiB from the same source (`getrandom`) at once and hands it out in slices.
//! The bytes are never reused and never leave the process except as the ids themselves.

use std::cell::RefCell;

use uuid::{Builder, Uuid};

use crate::time::{Clock, SystemClock};

const POOL_BYTES: usize = 1024;

struct Pool {
    bytes: [u8; POOL_BYTES],
    used: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool { bytes: [0; POOL_BYTES], used: POOL_BYTES })
    };
}

/// `N` fresh random bytes from the operating system's source, drawn in 1 KiB refills.
fn random<const N: usize>() -> [u8; N] {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.used + N > POOL_BYTES {
            getrandom::fill(&mut p.bytes).expect("the operating system's random source");
            p.used = 0;
        }
        let at = p.used;
        let mut out = [0u8; N];
        out.copy_from_slice(&p.bytes[at..at + N]);
        // Zero what was handed out, so the pool never holds a copy of an id in use.
        p.bytes[at..at + N].fill(0);
        p.used = at + N;
        out
    })
}

/// A UUIDv7 for a new task: the current Unix time in milliseconds and 74 random bits. Ids made
/// in the same millisecond are not ordered among themselves; tasks are ordered by their
/// storage sequence number, never by id.
pub fn task_id() -> Uuid {
    let ms = SystemClock.now().max(0) as u64;
    Builder::from_unix_timestamp_millis(ms, &random::<10>()).into_uuid()
}

/// The random part of a lease token: 96 bits (`lease::token` puts the attempt above them).
pub fn lease_random() -> u128 {
    let mut b = [0u8; 16];
    b[..12].copy_from_slice(&random::<12>());
    u128::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_well_formed_and_distinct_across_refills() {
        let mut seen = HashSet::new();
        for _ in 0..(3 * POOL_BYTES / 10) {
            let id = task_id();
            assert_eq!(id.get_version_num(), 7);
            assert!(seen.insert(id.as_u128()));
        }
        for _ in 0..(3 * POOL_BYTES / 12) {
            let r = lease_random();
            assert!(r < 1 << 96);
            assert!(seen.insert(r));
        }
    }

    #[test]
    fn task_ids_carry_the_current_time() {
        let before = SystemClock.now() as u64;
        let (secs, nanos) = task_id().get_timestamp().unwrap().to_unix();
        let ms = secs * 1000 + u64::from(nanos) / 1_000_000;
        assert!(ms >= before && ms <= before + 60_000);
    }
}
