//! The lease state machine: every transition of a task's status, as pure functions.
//!
//! This module owns the lease protocol and nothing else: it takes a task row and the time,
//! checks the rules, and changes the row. It knows nothing of redb (the store keeps the
//! indexes in step by diffing the row before and after) and nothing of HTTP, so a second
//! store can reuse it unchanged.
//!
//! Invariants kept here (and checked by the tests below and in `tests/`):
//! 1. **One holder.** A task has a lease iff its status is `running`; only [`claim`] creates a
//!    lease and it requires `queued`. So no task is ever leased to two agents at once.
//! 2. **Only the holder acts.** complete, fail, extend and progress require the current lease's
//!    agent name and, when given, its token; anything else is [`LeaseError::LeaseLost`].
//! 3. **Never reclaimed early.** [`reclaim`] refuses a lease whose `expires_at` is in the future.
//! 4. **History is append-only.** Each claim appends an attempt; each end of a lease closes
//!    exactly that attempt with its outcome. Attempts are never removed.
//! 5. **Leaving running clears the lease**, so a requeued task has no holder.
//! 6. **A token names one attempt.** Its high 32 bits are the number of the attempt its
//!    claim opened (see [`token`]), so a completed task, which keeps no lease, still tells the
//!    token of the lease that completed it (a repeated complete) from an older lease's.

use crate::model::{Attempt, Lease, Millis, Outcome, Progress, Rules, Task, TaskStatus};

/// Why a transition was refused. The API maps these to its codes in one place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The caller is not the current holder, or the task is not leased.
    #[error("{0}")]
    LeaseLost(String),
    /// The task's state does not allow this (cancel a finished task, retry a queued one, …).
    #[error("{0}")]
    Conflict(String),
}

fn lease_lost(task: &Task, agent: &str) -> LeaseError {
    LeaseError::LeaseLost(match &task.lease {
        Some(_) => format!(
            "task {} is not leased to agent {agent} under this lease",
            task.id
        ),
        None => format!(
            "task {} is not leased (status {})",
            task.id,
            task.status.as_str()
        ),
    })
}

/// Checks that `agent` (and `token`, when given) hold the task's current lease.
pub fn check_holder(task: &Task, agent: &str, token: Option<u128>) -> Result<(), LeaseError> {
    match &task.lease {
        Some(l) if task.status == TaskStatus::Running && l.agent == agent => match token {
            Some(t) if t != l.token => Err(lease_lost(task, agent)),
            _ => Ok(()),
        },
        _ => Err(lease_lost(task, agent)),
    }
}

/// The bits of a token that are random: 96, too many to guess.
const RANDOM_BITS: u32 = 96;

/// The lease token of attempt `attempt`: the attempt number in the high 32 bits, the low 96
/// bits of `random` below. The attempt number is not a secret; the random part is what no
/// other process can guess.
pub fn token(attempt: u32, random: u128) -> u128 {
    (u128::from(attempt) << RANDOM_BITS) | (random & ((1 << RANDOM_BITS) - 1))
}

/// The attempt a token was made for (see [`token`]).
fn token_attempt(token: u128) -> u32 {
    (token >> RANDOM_BITS) as u32
}

/// The attempts a task keeps in its history, the latest ones; numbering goes on past it. A
/// task is retried by hand as often as a producer likes, and its row (rewritten by every
/// transition, read by every look at the task) must not grow with it: 100 attempts with
/// errors of the longest allowed text are ~1 MB.
pub const MAX_ATTEMPTS_KEPT: usize = 100;

/// Leases a queued task to `agent` until `now + rules.lease_ms` and opens a new attempt, under
/// a token made of the attempt's number and `random`.
pub fn claim(task: &mut Task, agent: &str, random: u128, rules: &Rules, now: Millis) {
    debug_assert_eq!(task.status, TaskStatus::Queued);
    let attempt = task.attempts.last().map_or(1, |a| a.attempt + 1);
    let over = (task.attempts.len() + 1).saturating_sub(MAX_ATTEMPTS_KEPT);
    task.attempts.drain(..over);
    let token = token(attempt, random);
    task.status = TaskStatus::Running;
    task.delayed = false;
    task.lease = Some(Lease {
        agent: agent.to_string(),
        token,
        assigned_at: now,
        expires_at: now.saturating_add(rules.lease_ms.max(1)),
    });
    task.started_at = Some(now);
    task.updated_at = now;
    task.attempts.push(Attempt {
        attempt,
        agent_name: agent.to_string(),
        started_at: now,
        ended_at: None,
        outcome: Outcome::Running,
        error: None,
    });
}

/// Closes the open attempt (the last one) with `outcome`.
fn close_attempt(task: &mut Task, outcome: Outcome, error: Option<String>, now: Millis) {
    if let Some(a) = task.attempts.last_mut() {
        if a.outcome == Outcome::Running {
            a.outcome = outcome;
            a.ended_at = Some(now);
            a.error = error;
        }
    }
}

/// Whether the task's last attempt was `agent`'s and ended with `outcome` (under `token`'s
/// lease, when a token is given): a complete or fail repeated by its holder.
fn last_ended_by(task: &Task, agent: &str, token: Option<u128>, outcome: Outcome) -> bool {
    task.attempts.last().is_some_and(|a| {
        a.agent_name == agent
            && a.outcome == outcome
            && token.is_none_or(|t| token_attempt(t) == a.attempt)
    })
}

/// What a `complete` call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The task moved to `completed` now.
    Completed,
    /// The same agent repeated a complete that had already succeeded: nothing changed.
    AlreadyCompleted,
}

/// Completes the task for its holder. A repeat by the agent of the last attempt, after the
/// task completed, is accepted without change (safe retries over a flaky network); with a
/// token, only the token of that attempt's lease repeats it.
pub fn complete(
    task: &mut Task,
    agent: &str,
    token: Option<u128>,
    result: Option<String>,
    outputs: Option<String>,
    now: Millis,
) -> Result<Completion, LeaseError> {
    if task.status == TaskStatus::Completed {
        if last_ended_by(task, agent, token, Outcome::Completed) {
            return Ok(Completion::AlreadyCompleted);
        }
        return Err(lease_lost(task, agent));
    }
    check_holder(task, agent, token)?;
    close_attempt(task, Outcome::Completed, None, now);
    task.status = TaskStatus::Completed;
    task.lease = None;
    task.result = result;
    task.outputs = outputs;
    task.completed_at = Some(now);
    task.updated_at = now;
    Ok(Completion::Completed)
}

/// Ends the current lease as failed (`outcome`), then requeues with back-off while retries
/// remain and the failure is retryable, else ends the task `failed`. Returns `willRetry`.
fn end_failed(
    task: &mut Task,
    outcome: Outcome,
    error: String,
    can_retry: bool,
    rules: &Rules,
    now: Millis,
) -> bool {
    close_attempt(task, outcome, Some(error.clone()), now);
    task.lease = None;
    task.error = Some(error);
    task.updated_at = now;
    if can_retry && task.retry_count < task.max_retries {
        task.retry_count += 1;
        let delay = rules.backoff_ms(task.retry_count);
        task.status = TaskStatus::Queued;
        task.delayed = delay > 0;
        task.not_before = (delay > 0).then(|| now.saturating_add(delay));
        true
    } else {
        task.status = TaskStatus::Failed;
        task.completed_at = Some(now);
        false
    }
}

/// The holder reports failure. Returns whether the task will be retried.
///
/// A repeat by the agent of the last attempt, after its fail was applied and before the task
/// was claimed again, is accepted without change (its answer may have been lost, in a crash
/// say); with a token, only the token of that attempt's lease repeats it. Its `willRetry` is
/// what the task as it stands says: queued again, or not (failed, or cancelled since).
pub fn fail(
    task: &mut Task,
    agent: &str,
    token: Option<u128>,
    error: String,
    can_retry: bool,
    rules: &Rules,
    now: Millis,
) -> Result<bool, LeaseError> {
    if task.status != TaskStatus::Running && last_ended_by(task, agent, token, Outcome::Failed) {
        return Ok(task.status == TaskStatus::Queued);
    }
    check_holder(task, agent, token)?;
    Ok(end_failed(
        task,
        Outcome::Failed,
        error,
        can_retry,
        rules,
        now,
    ))
}

/// Reclaims an expired lease as a timed-out attempt. Refuses (returns None) if the task is not
/// running or its lease has not expired yet: a lease is never reclaimed early.
pub fn reclaim(task: &mut Task, rules: &Rules, now: Millis) -> Option<bool> {
    let lease = task.lease.as_ref()?;
    if task.status != TaskStatus::Running || lease.expires_at > now {
        return None;
    }
    let msg = format!(
        "lease of agent {} expired at {}",
        lease.agent,
        crate::time::format(lease.expires_at)
    );
    Some(end_failed(task, Outcome::Timeout, msg, true, rules, now))
}

/// Heartbeat: the lease now ends at `now + ms`, never earlier than it already did.
pub fn extend(
    task: &mut Task,
    agent: &str,
    token: Option<u128>,
    ms: i64,
    now: Millis,
) -> Result<(), LeaseError> {
    check_holder(task, agent, token)?;
    if let Some(l) = task.lease.as_mut() {
        l.expires_at = l.expires_at.max(now.saturating_add(ms));
    }
    task.updated_at = now;
    Ok(())
}

pub fn progress(
    task: &mut Task,
    agent: &str,
    token: Option<u128>,
    progress: Progress,
    now: Millis,
) -> Result<(), LeaseError> {
    check_holder(task, agent, token)?;
    task.progress = Some(progress);
    task.updated_at = now;
    Ok(())
}

/// Cancels a queued or running task. The holder's later calls get `LeaseLost`.
pub fn cancel(task: &mut Task, reason: Option<String>, now: Millis) -> Result<(), LeaseError> {
    match task.status {
        TaskStatus::Queued | TaskStatus::Running => {}
        s => {
            return Err(LeaseError::Conflict(format!(
                "task {} is already {} and cannot be cancelled",
                task.id,
                s.as_str()
            )))
        }
    }
    close_attempt(task, Outcome::Cancelled, reason.clone(), now);
    task.status = TaskStatus::Cancelled;
    task.lease = None;
    task.delayed = false;
    task.cancelled_at = Some(now);
    task.cancel_reason = reason;
    task.updated_at = now;
    Ok(())
}

/// Puts a failed or cancelled task back in the queue, available at once.
pub fn retry(task: &mut Task, now: Millis) -> Result<(), LeaseError> {
    match task.status {
        TaskStatus::Failed | TaskStatus::Cancelled => {}
        s => {
            return Err(LeaseError::Conflict(format!(
                "only failed or cancelled tasks can be retried; task {} is {}",
                task.id,
                s.as_str()
            )))
        }
    }
    task.status = TaskStatus::Queued;
    task.lease = None;
    task.delayed = false;
    task.not_before = None;
    task.completed_at = None;
    task.cancelled_at = None;
    task.updated_at = now;
    Ok(())
}

/// Moves a delayed task whose `not_before` has passed into the ready set.
pub fn promote(task: &mut Task, now: Millis) -> bool {
    if task.status == TaskStatus::Queued && task.delayed && task.not_before.unwrap_or(0) <= now {
        task.delayed = false;
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        lease_ms: 60_000,
        retry_delay_seconds: 0.0,
        backoff_multiplier: 2.0,
    };

    fn queued(max_retries: u32) -> Task {
        Task {
            max_retries,
            ..Task::queued(1, "t1".into(), 1, 0)
        }
    }

    #[test]
    fn only_the_holder_completes() {
        let mut t = queued(0);
        claim(&mut t, "a", 7, &RULES, 1000);
        let held = token(1, 7);
        assert_eq!(t.lease.as_ref().map(|l| l.token), Some(held));
        assert!(matches!(
            complete(&mut t, "b", None, None, None, 1001),
            Err(LeaseError::LeaseLost(_))
        ));
        assert!(matches!(
            complete(&mut t, "a", Some(token(1, 8)), None, None, 1001),
            Err(LeaseError::LeaseLost(_))
        ));
        assert_eq!(
            complete(&mut t, "a", Some(held), Some("ok".into()), None, 1002),
            Ok(Completion::Completed)
        );
        assert_eq!(t.status, TaskStatus::Completed);
        assert!(t.lease.is_none());
        assert_eq!(
            complete(&mut t, "a", None, None, None, 1003),
            Ok(Completion::AlreadyCompleted)
        );
        assert_eq!(
            complete(&mut t, "a", Some(held), None, None, 1003),
            Ok(Completion::AlreadyCompleted)
        );
        assert!(complete(&mut t, "b", None, None, None, 1003).is_err());
    }

    #[test]
    fn a_token_of_an_earlier_attempt_does_not_repeat_a_complete() {
        let mut t = queued(1);
        claim(&mut t, "a", 7, &RULES, 0);
        let stale = t.lease.as_ref().unwrap().token;
        assert_eq!(reclaim(&mut t, &RULES, 60_000), Some(true));
        claim(&mut t, "a", 7, &RULES, 60_001);
        let fresh = t.lease.as_ref().unwrap().token;
        assert_ne!(fresh, stale, "same random part, another attempt");
        complete(&mut t, "a", Some(fresh), None, None, 60_002).unwrap();
        assert!(matches!(
            complete(&mut t, "a", Some(stale), None, None, 60_003),
            Err(LeaseError::LeaseLost(_))
        ));
        assert_eq!(
            complete(&mut t, "a", Some(fresh), None, None, 60_003),
            Ok(Completion::AlreadyCompleted)
        );
    }

    #[test]
    fn a_token_keeps_its_attempt_and_96_random_bits() {
        assert_eq!(token_attempt(token(3, u128::MAX)), 3);
        assert_eq!(token(3, u128::MAX) & ((1 << 96) - 1), (1 << 96) - 1);
        assert_eq!(token_attempt(token(u32::MAX, 0)), u32::MAX);
    }

    #[test]
    fn lease_is_never_reclaimed_early() {
        let mut t = queued(1);
        claim(&mut t, "a", 1, &RULES, 0);
        assert_eq!(reclaim(&mut t, &RULES, 59_999), None);
        assert_eq!(t.status, TaskStatus::Running);
        assert_eq!(reclaim(&mut t, &RULES, 60_000), Some(true));
        assert_eq!(t.status, TaskStatus::Queued);
        assert_eq!(t.attempts[0].outcome, Outcome::Timeout);
        assert!(t.lease.is_none());
    }

    #[test]
    fn fail_retries_until_max_then_fails() {
        let rules = Rules {
            retry_delay_seconds: 1.0,
            ..RULES
        };
        let mut t = queued(1);
        claim(&mut t, "a", 1, &rules, 0);
        assert_eq!(
            fail(&mut t, "a", None, "x".into(), true, &rules, 10),
            Ok(true)
        );
        assert_eq!(t.status, TaskStatus::Queued);
        assert!(t.delayed);
        assert_eq!(t.not_before, Some(1010));
        assert!(!promote(&mut t, 1009));
        assert!(promote(&mut t, 1010));
        claim(&mut t, "a", 2, &rules, 2000);
        assert_eq!(
            fail(&mut t, "a", None, "y".into(), true, &rules, 2001),
            Ok(false)
        );
        assert_eq!(t.status, TaskStatus::Failed);
        assert_eq!(t.retry_count, 1);
        assert_eq!(t.attempts.len(), 2);
        assert_eq!(t.error.as_deref(), Some("y"));
    }

    /// Without a retry delay (the default) a failed task is ready again at once: not filed
    /// as delayed, no `notBefore`, nothing for the scheduler to promote.
    #[test]
    fn a_failure_without_back_off_is_ready_at_once() {
        let mut t = queued(1);
        claim(&mut t, "a", 1, &RULES, 0);
        assert_eq!(
            fail(&mut t, "a", None, "x".into(), true, &RULES, 10),
            Ok(true)
        );
        assert_eq!(t.status, TaskStatus::Queued);
        assert!(!t.delayed);
        assert_eq!(t.not_before, None);
        assert!(!promote(&mut t, 10));
    }

    #[test]
    fn a_task_keeps_its_last_100_attempts_and_counts_on() {
        let mut t = queued(0);
        for i in 0..150 {
            claim(&mut t, "a", 1, &RULES, i);
            assert_eq!(
                fail(&mut t, "a", None, "x".into(), true, &RULES, i),
                Ok(false)
            );
            retry(&mut t, i).unwrap();
        }
        claim(&mut t, "a", 1, &RULES, 200);
        assert_eq!(t.attempts.len(), MAX_ATTEMPTS_KEPT);
        assert_eq!(t.attempts[0].attempt, 52);
        assert_eq!(t.attempts.last().unwrap().attempt, 151);
        let held = t.lease.as_ref().unwrap().token;
        assert_eq!(token_attempt(held), 151);
        complete(&mut t, "a", Some(held), None, None, 201).unwrap();
        assert_eq!(
            complete(&mut t, "a", Some(held), None, None, 202),
            Ok(Completion::AlreadyCompleted),
            "the repeat of a complete still knows its attempt"
        );
    }

    /// A fail whose answer was lost is repeated by its agent (with its token, or without
    /// one): the same answer, nothing changed; another agent, an older attempt's token, or a
    /// repeat after the task was claimed again are refused.
    #[test]
    fn a_repeated_fail_answers_as_the_first_did() {
        let mut t = queued(1);
        claim(&mut t, "a", 7, &RULES, 0);
        let first = t.lease.as_ref().unwrap().token;
        assert_eq!(
            fail(&mut t, "a", Some(first), "x".into(), true, &RULES, 1),
            Ok(true)
        );
        let after = t.clone();
        assert_eq!(
            fail(&mut t, "a", Some(first), "x".into(), true, &RULES, 2),
            Ok(true)
        );
        assert_eq!(
            fail(&mut t, "a", None, "y".into(), true, &RULES, 3),
            Ok(true)
        );
        assert_eq!(t, after, "a repeat changes nothing");
        assert!(matches!(
            fail(&mut t, "b", None, "x".into(), true, &RULES, 4),
            Err(LeaseError::LeaseLost(_))
        ));
        // The second and last attempt fails for good; the first attempt's token is stale.
        claim(&mut t, "a", 7, &RULES, 5);
        assert!(matches!(
            fail(&mut t, "a", Some(first), "x".into(), true, &RULES, 6),
            Err(LeaseError::LeaseLost(_))
        ));
        let second = t.lease.as_ref().unwrap().token;
        assert_eq!(
            fail(&mut t, "a", Some(second), "z".into(), true, &RULES, 7),
            Ok(false)
        );
        assert_eq!(
            fail(&mut t, "a", Some(second), "z".into(), true, &RULES, 8),
            Ok(false)
        );
        assert!(matches!(
            fail(&mut t, "a", Some(first), "x".into(), true, &RULES, 9),
            Err(LeaseError::LeaseLost(_))
        ));
        assert_eq!(t.status, TaskStatus::Failed);
        assert_eq!(t.attempts.len(), 2);
    }

    /// A lease that expired was not failed by its holder: a late fail is refused.
    #[test]
    fn a_fail_after_the_lease_expired_is_not_a_repeat() {
        let mut t = queued(1);
        claim(&mut t, "a", 7, &RULES, 0);
        assert_eq!(reclaim(&mut t, &RULES, 60_000), Some(true));
        assert!(matches!(
            fail(&mut t, "a", None, "x".into(), true, &RULES, 60_001),
            Err(LeaseError::LeaseLost(_))
        ));
    }

    #[test]
    fn extend_never_shortens() {
        let mut t = queued(0);
        claim(&mut t, "a", 1, &RULES, 0);
        extend(&mut t, "a", None, 1000, 10).unwrap();
        assert_eq!(t.lease.as_ref().unwrap().expires_at, 60_000);
        extend(&mut t, "a", None, 120_000, 10).unwrap();
        assert_eq!(t.lease.as_ref().unwrap().expires_at, 120_010);
    }

    #[test]
    fn cancel_then_retry() {
        let mut t = queued(0);
        claim(&mut t, "a", 1, &RULES, 0);
        cancel(&mut t, Some("stop".into()), 5).unwrap();
        assert!(check_holder(&t, "a", None).is_err());
        assert!(matches!(
            cancel(&mut t, None, 6),
            Err(LeaseError::Conflict(_))
        ));
        retry(&mut t, 7).unwrap();
        assert_eq!(t.status, TaskStatus::Queued);
        assert!(matches!(retry(&mut t, 8), Err(LeaseError::Conflict(_))));
    }
}
