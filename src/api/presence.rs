//! When each agent last called the lease protocol (next-task, complete, fail, heartbeat,
//! progress): the "last seen" of `GET /api/projects/{id}/agents` and the dashboard.
//!
//! Kept in memory only: presence is about the last minutes, and a restart forgets it (an agent
//! still at work is seen again at its next call). Bounded: past [`MAX_AGENTS`] names the ones
//! not seen for an hour are dropped, and if that is not enough, all.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::model::Millis;

/// The most agent names remembered (~100 bytes each).
pub const MAX_AGENTS: usize = 100_000;

const HOUR_MS: Millis = 3_600_000;

#[derive(Default)]
pub struct Presence {
    seen: Mutex<HashMap<String, Millis>>,
}

impl Presence {
    /// Records a call of `agent` at `now`.
    pub fn saw(&self, agent: &str, now: Millis) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = seen.get_mut(agent) {
            *at = (*at).max(now);
            return;
        }
        if seen.len() >= MAX_AGENTS {
            seen.retain(|_, at| *at > now - HOUR_MS);
            if seen.len() >= MAX_AGENTS {
                seen.clear();
            }
        }
        seen.insert(agent.to_string(), now);
    }

    /// When `agent` last called, if this process has seen it.
    pub fn last_seen(&self, agent: &str) -> Option<Millis> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(agent).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_latest_call_and_stays_bounded() {
        let p = Presence::default();
        p.saw("a", 10);
        p.saw("a", 5);
        assert_eq!(p.last_seen("a"), Some(10));
        assert_eq!(p.last_seen("b"), None);
        for i in 0..MAX_AGENTS {
            p.saw(&format!("x{i}"), 20);
        }
        // Full: the names not seen for an hour are dropped first; here none is that old.
        p.saw("late", HOUR_MS + 15);
        assert_eq!(p.last_seen("a"), None, "seen over an hour before");
        assert_eq!(p.last_seen("late"), Some(HOUR_MS + 15));
        assert!(p.seen.lock().unwrap().len() <= MAX_AGENTS);
    }
}
