//! The store under random operations of agents and producers (claims, completes, fails,
//! extends; updates of priority and `notBefore`, `null` included; cancels, retries,
//! deletes), restarts included. After every step the index holds exactly the entries the
//! task rows imply, the counters equal the rows, the writer's in-memory lease cache equals
//! the leases the committed rows hold, and no queued task is ready before its `notBefore`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use agentq::model::{Activity, Millis, Outcome, ProjectConfig, Stats, Task, TaskStatus};
use agentq::store::leases::Leases;
use agentq::store::tables::{index_entries, ix, load_task, ACTIVITY_MINUTES};
use agentq::store::write::{self, NewProject, NewTask};
use agentq::store::Store;
use agentq::time::{Clock, ManualClock};
use proptest::prelude::*;
use redb::ReadableTable;

#[derive(Debug, Clone)]
enum Op {
    Create {
        typed: bool,
        priority: u8,
    },
    Claim {
        agent: usize,
        typed_only: bool,
    },
    Complete {
        agent: usize,
    },
    /// next-task's `complete`: the held task completed and the next claimed in one write.
    CompleteThenNext {
        agent: usize,
        typed_only: bool,
    },
    Fail {
        agent: usize,
    },
    Extend {
        agent: usize,
    },
    /// A producer's `PUT` of the `pick`-th queued task: a new priority, and a `notBefore`
    /// set, moved or cleared (`null`).
    Update {
        pick: usize,
        priority: Option<u8>,
        not_before: NotBefore,
    },
    /// Cancel the `pick`-th queued or running task.
    Cancel {
        pick: usize,
    },
    /// Retry the `pick`-th cancelled task.
    Retry {
        pick: usize,
    },
    /// Delete the `pick`-th task that is not finished (a finished task stays: the activity
    /// rows checked below count it).
    Delete {
        pick: usize,
    },
    Advance {
        ms: i64,
    },
    /// The wall clock steps forward without time passing (an NTP step): a reaper's pass then
    /// finds leases expired on the wall clock whose time has not passed.
    Step {
        ms: i64,
    },
    Restart,
}

#[derive(Debug, Clone, Copy)]
enum NotBefore {
    Keep,
    Clear,
    /// This many ms from now (negative: already past).
    In(i64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<bool>(), 0u8..=10).prop_map(|(typed, priority)| Op::Create { typed, priority }),
        4 => (0usize..4, any::<bool>()).prop_map(|(agent, typed_only)| Op::Claim { agent, typed_only }),
        2 => (0usize..4).prop_map(|agent| Op::Complete { agent }),
        2 => (0usize..4, any::<bool>()).prop_map(|(agent, typed_only)| Op::CompleteThenNext { agent, typed_only }),
        1 => (0usize..4).prop_map(|agent| Op::Fail { agent }),
        1 => (0usize..4).prop_map(|agent| Op::Extend { agent }),
        1 => prop_oneof![Just(1_000i64), Just(30_000), Just(61_000), Just(1_800_000)].prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Restart),
        1 => prop_oneof![Just(61_000i64), Just(3_600_000)].prop_map(|ms| Op::Step { ms }),
        1 => (any::<usize>(), prop::option::of(0u8..=10), not_before())
            .prop_map(|(pick, priority, not_before)| Op::Update { pick, priority, not_before }),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Retry { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Delete { pick }),
    ]
}

fn not_before() -> impl Strategy<Value = NotBefore> {
    prop_oneof![
        Just(NotBefore::Keep),
        Just(NotBefore::Clear),
        prop_oneof![Just(-5_000i64), Just(20_000), Just(90_000)].prop_map(NotBefore::In),
    ]
}

struct World {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    store: Option<Arc<Store>>,
    project: u128,
    ty: u128,
    /// (task seq, leaseExpiresAt) → the lease's deadline on the steady clock, noted when the
    /// check first sees the lease (every operation is followed by a check, at the time the
    /// operation ran): as far off as its expiry was on the wall clock then.
    deadlines: HashMap<(u64, Millis), Millis>,
    /// Whether the last operation was a reaper's pass (the only one that reclaims).
    reaped: bool,
}

impl World {
    fn new() -> World {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(1_767_225_600_000));
        let store = Store::open(&dir.path().join("m.redb"), clock.clone()).unwrap();
        let (project, _) = rt
            .block_on(store.write(|w| {
                let config = ProjectConfig {
                    default_max_retries: 1,
                    default_lease_duration_minutes: 1,
                    reaper_interval_minutes: 1,
                };
                let project = NewProject {
                    config,
                    ..NewProject::named("p")
                };
                write::create_project(w, project)
            }))
            .unwrap();
        let key = uuid::Uuid::from_u128(project.id).to_string();
        let ty = rt
            .block_on(store.write(move |w| {
                write::create_type(
                    w,
                    &key,
                    write::NewTaskType {
                        name: "t".into(),
                        template: None,
                        variables: vec![],
                        duplicate_handling: agentq::model::DuplicateHandling::Allow,
                        max_retries: Some(1),
                        lease_duration_minutes: Some(1.0),
                        retry_delay_seconds: 20.0,
                        backoff_multiplier: 2.0,
                        script: None,
                    },
                )
            }))
            .unwrap();
        World {
            rt,
            dir,
            clock,
            store: Some(store),
            project: project.id,
            ty: ty.id,
            deadlines: HashMap::new(),
            reaped: false,
        }
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("open")
    }

    fn key(&self) -> String {
        uuid::Uuid::from_u128(self.project).to_string()
    }

    /// Runs one operation; refusals (lease lost, nothing to claim) are part of the game.
    fn apply(&mut self, op: &Op) {
        self.reaped = matches!(op, Op::Advance { .. } | Op::Step { .. });
        let (key, ty, project) = (self.key(), self.ty, self.project);
        let agent = |a: &usize| format!("agent-{a}");
        let result: agentq::error::Result<()> = match op.clone() {
            Op::Create { typed, priority } => {
                let task = NewTask {
                    type_key: typed.then_some(agentq::store::write::TypeKey::Id(ty)),
                    instructions: Some("x".into()),
                    // Variables, so that the DUPES entries checked below hash a real body.
                    variables: BTreeMap::from([("v".to_string(), (priority % 4).to_string())]),
                    priority: Some(priority),
                    // Some tasks in a batch, so the check below covers BATCH entries too.
                    batch_id: (priority % 2 == 0).then(|| format!("b{}", priority % 3)),
                    ..NewTask::default()
                };
                self.rt
                    .block_on(
                        self.store()
                            .write(move |w| write::create_tasks(w, &key, vec![task])),
                    )
                    .map(|_| ())
            }
            Op::Claim {
                agent: a,
                typed_only,
            } => {
                let name = agent(&a);
                self.rt
                    .block_on(self.store().write(move |w| {
                        let types = [ty];
                        write::next_task(
                            w,
                            &key,
                            &name,
                            typed_only.then_some(&types[..]),
                            write::no_check,
                        )
                    }))
                    .map(|_| ())
            }
            Op::CompleteThenNext {
                agent: a,
                typed_only,
            } => {
                let name = agent(&a);
                self.rt.block_on(self.store().write(move |w| {
                    let Some(seq) = w.tables.leases.held(project, &name) else {
                        return Ok(());
                    };
                    let Some(t) = w.tables.task(seq)? else {
                        return Ok(());
                    };
                    let done = write::Done {
                        id: t.id.clone(),
                        token: t.lease.as_ref().map(|l| l.token),
                        result: Some("r".into()),
                        ..write::Done::default()
                    };
                    let types = [ty];
                    let claim = write::next_task_after(
                        w,
                        Some((done, write::no_check)),
                        &key,
                        &name,
                        typed_only.then_some(&types[..]),
                        write::no_check,
                    )?;
                    // The completed task is never the one handed out next.
                    if let write::Claim::Task(next, _) = claim {
                        assert_ne!(next.id, t.id);
                    }
                    Ok(())
                }))
            }
            Op::Complete { agent: a } | Op::Fail { agent: a } | Op::Extend { agent: a } => {
                let name = agent(&a);
                let op = op.clone();
                self.rt.block_on(self.store().write(move |w| {
                    let Some(seq) = w.tables.leases.held(project, &name) else {
                        return Ok(());
                    };
                    let Some(t) = w.tables.task(seq)? else {
                        return Ok(());
                    };
                    match op {
                        Op::Complete { .. } => {
                            let done = write::Done {
                                execution: Some(execution()),
                                ..write::Done::new(&t.id)
                            };
                            write::complete(w, done, &name, write::no_check).map(|_| ())
                        }
                        Op::Fail { .. } => {
                            let f = write::Failed {
                                id: t.id.clone(),
                                token: None,
                                error: "e".into(),
                                can_retry: true,
                                execution: Some(execution()),
                            };
                            write::fail(w, f, &name, write::no_check).map(|_| ())
                        }
                        _ => write::extend(w, &t.id, &name, None, 60_000, write::no_check)
                            .map(|_| ()),
                    }
                }))
            }
            Op::Update {
                pick,
                priority,
                not_before,
            } => {
                let now = self.clock.now();
                let patch = write::TaskPatch {
                    priority,
                    not_before: match not_before {
                        NotBefore::Keep => None,
                        NotBefore::Clear => Some(None),
                        NotBefore::In(ms) => Some(Some(now + ms)),
                    },
                    ..write::TaskPatch::default()
                };
                self.on_task(pick, &[TaskStatus::Queued], move |w, id| {
                    write::update_task(w, id, patch).map(|_| ())
                })
            }
            Op::Cancel { pick } => {
                let open = [TaskStatus::Queued, TaskStatus::Running];
                self.on_task(pick, &open, |w, id| {
                    write::cancel(w, id, None, write::no_check).map(|_| ())
                })
            }
            Op::Retry { pick } => self.on_task(pick, &[TaskStatus::Cancelled], |w, id| {
                write::retry(w, id, write::no_check).map(|_| ())
            }),
            Op::Delete { pick } => {
                let unfinished = [
                    TaskStatus::Queued,
                    TaskStatus::Running,
                    TaskStatus::Cancelled,
                ];
                self.on_task(pick, &unfinished, write::delete_task)
            }
            Op::Advance { ms } | Op::Step { ms } => {
                if matches!(op, Op::Advance { .. }) {
                    self.clock.advance(ms);
                } else {
                    self.clock.step(ms);
                }
                self.rt.block_on(self.store().write(|w| {
                    write::promote_due(w, 1000)?;
                    write::reclaim_expired(w, None, 1000)?;
                    Ok(())
                }))
            }
            Op::Restart => {
                // The new process measures its leases again from the wall clock.
                self.deadlines.clear();
                let old = self.store.take().expect("open");
                old.close();
                drop(old);
                let path = self.dir.path().join("m.redb");
                self.store = Some(Store::open(&path, self.clock.clone()).unwrap());
                Ok(())
            }
        };
        if let Err(e) = result {
            assert!(
                !matches!(
                    e,
                    agentq::error::Error::Storage(_) | agentq::error::Error::Unavailable(_)
                ),
                "storage error on {op:?}: {e}"
            );
        }
    }

    /// Runs `f` on the `pick`-th (modulo their number) task whose status is among `statuses`,
    /// in creation order; nothing when there is none.
    fn on_task(
        &self,
        pick: usize,
        statuses: &[TaskStatus],
        f: impl FnOnce(&mut agentq::store::WriteCtx, &str) -> agentq::error::Result<()> + Send + 'static,
    ) -> agentq::error::Result<()> {
        let ids: Vec<String> = self
            .committed()
            .tasks
            .into_iter()
            .filter(|t| statuses.contains(&t.status))
            .map(|t| t.id)
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let id = ids[pick % ids.len()].clone();
        self.rt.block_on(self.store().write(move |w| f(w, &id)))
    }

    /// What is committed, read in a write that changes nothing (so it is not committed, and
    /// sees everything committed before it): the rows, the bodies, the index, the live
    /// projects, the leases the index implies and the writer's lease cache.
    fn committed(&self) -> Committed {
        let clock = self.clock.clone();
        self.rt
            .block_on(self.store().write(move |w| {
                let t = &w.tables;
                let rows: Vec<u64> = keys_of(&*t.tasks);
                let bodies: Vec<u64> = keys_of(&*t.bodies);
                let executions: Vec<u64> = t
                    .executions
                    .iter()
                    .unwrap()
                    .map(|r| r.unwrap().0.value().0)
                    .collect();
                let tasks = rows
                    .iter()
                    .map(|seq| load_task(&*t.tasks, &*t.bodies, *seq).unwrap().unwrap())
                    .collect();
                let index = t
                    .index
                    .iter()
                    .unwrap()
                    .map(|r| {
                        let (k, v) = r.unwrap();
                        (k.value().to_vec(), v.value().to_vec())
                    })
                    .collect();
                let projects = t
                    .projects
                    .iter()
                    .unwrap()
                    .map(|r| r.unwrap().0.value())
                    .collect();
                let leases = Leases::load(&*t.projects, &*t.index, clock.as_ref()).unwrap();
                Ok(Committed {
                    rows,
                    bodies,
                    executions,
                    tasks,
                    index,
                    projects,
                    leases,
                    cache: t.leases.clone(),
                })
            }))
            .unwrap()
    }

    /// Index entries, counters and the lease cache against the committed rows.
    fn check(&mut self) {
        let snapshot = self.committed();
        assert_eq!(
            snapshot.rows, snapshot.bodies,
            "a body for each row, no other"
        );
        for seq in &snapshot.executions {
            assert!(
                snapshot.rows.binary_search(seq).is_ok(),
                "an execution of task {seq}, which is gone"
            );
        }
        let tasks: Vec<Task> = snapshot.tasks.clone();
        let mut expected: BTreeSet<(Vec<u8>, Vec<u8>)> = BTreeSet::new();
        let mut counts = Stats::default();
        for t in &tasks {
            expected.extend(index_entries(t).into_iter().map(|(k, v)| (k.to_vec(), v)));
            counts.total += 1;
            match t.status {
                TaskStatus::Queued => counts.queued += 1,
                TaskStatus::Running => counts.running += 1,
                TaskStatus::Completed => counts.completed += 1,
                TaskStatus::Failed => counts.failed += 1,
                TaskStatus::Cancelled => counts.cancelled += 1,
            }
            counts.delayed += (t.status == TaskStatus::Queued && t.delayed) as u64;
            assert_eq!(t.lease.is_some(), t.status == TaskStatus::Running, "{t:?}");
            // A queued task waits for a `notBefore` still to come, in the delayed index; one
            // whose time came may wait there until the scheduler's pass.
            let future = t.not_before.is_some_and(|nb| nb > self.clock.now());
            if t.status == TaskStatus::Queued && future {
                assert!(t.delayed, "ready before its notBefore: {t:?}");
            }
            if t.delayed {
                assert!(
                    t.status == TaskStatus::Queued && t.not_before.is_some(),
                    "{t:?}"
                );
            }
        }
        let mut stored: BTreeSet<(Vec<u8>, Vec<u8>)> = BTreeSet::new();
        let mut stats = None;
        let mut activity: BTreeMap<i64, Activity> = BTreeMap::new();
        for (k, v) in snapshot.index.iter().cloned() {
            if k[0] == ix::STATS {
                stats = Some(Stats::from_bytes(&v));
            } else if k[0] == ix::ACTIVITY {
                let project = u128::from_be_bytes(k[1..17].try_into().unwrap());
                assert!(
                    snapshot.projects.contains(&project),
                    "activity of a deleted project is kept"
                );
                activity.insert(ix::i64_at(&k, 17), Activity::from_bytes(&v));
            } else {
                stored.insert((k, v));
            }
        }
        assert_eq!(stored, expected, "index entries equal what the rows imply");
        assert_eq!(stats.unwrap_or_default(), counts, "counters equal the rows");
        // Tasks here never leave `completed` or `failed`, and the clock only goes forward, so
        // the activity rows are what the finished rows imply, for the minutes still kept.
        let mut implied: BTreeMap<i64, Activity> = BTreeMap::new();
        for t in &tasks {
            if let Some((minute, a)) = Activity::of(None, Some(t)) {
                implied.entry(minute).or_default().add(a);
            }
        }
        if let Some(&last) = implied.keys().last() {
            implied.retain(|m, _| *m > last - ACTIVITY_MINUTES);
        }
        assert_eq!(
            activity, implied,
            "activity equals what the finished rows imply"
        );
        let (committed, cache) = (snapshot.leases, snapshot.cache);
        assert_eq!(
            cache, committed,
            "the lease cache equals the committed leases"
        );
        // The scheduler's next look: the earliest of each lease's expiry and the wall-clock
        // time at which its steady deadline passes (a step of the wall clock reclaims no lease
        // early; see store::leases).
        let (now, steady) = (self.clock.now(), self.clock.steady());
        let leases: HashSet<(u64, Millis)> = tasks
            .iter()
            .filter_map(|t| t.lease.as_ref().map(|l| (t.seq, l.expires_at)))
            .collect();
        // A lease the last operation reclaimed had passed both its expiry and its deadline.
        for (&(seq, expires), &deadline) in &self.deadlines {
            let reclaimed_now = self.reaped
                && !leases.contains(&(seq, expires))
                && tasks.iter().any(|t| {
                    t.seq == seq
                        && t.attempts
                            .iter()
                            .any(|a| a.outcome == Outcome::Timeout && a.ended_at == Some(now))
                });
            if reclaimed_now {
                assert!(
                    expires <= now && deadline <= steady,
                    "task {seq} reclaimed early: expires {expires}, deadline {deadline}, \
                     now {now}, steady {steady}"
                );
            }
        }
        self.deadlines.retain(|k, _| leases.contains(k));
        let first = leases
            .iter()
            .map(|&(seq, expires)| {
                let deadline = *self
                    .deadlines
                    .entry((seq, expires))
                    .or_insert(steady + (expires - now).max(0));
                expires.max(now + (deadline - steady))
            })
            .min();
        assert_eq!(self.store().hub.first_lease(), first);
        let running: Vec<&Task> = tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Running)
            .collect();
        // Every running task is held by its lease's agent in the committed cache (which the
        // writer's equals, above), and nothing else falls due.
        for t in &running {
            let agent = &t.lease.as_ref().expect("a running task has a lease").agent;
            assert_eq!(committed.held(t.project_id, agent), Some(t.seq));
        }
        assert!(committed.due(usize::MAX).len() <= running.len());
    }
}

/// What [`World::committed`] read.
struct Committed {
    rows: Vec<u64>,
    bodies: Vec<u64>,
    /// The task (seq) of each execution kept.
    executions: Vec<u64>,
    tasks: Vec<Task>,
    index: Vec<(Vec<u8>, Vec<u8>)>,
    projects: std::collections::HashSet<u128>,
    leases: Leases,
    cache: Leases,
}

/// The keys of a table of task seqs, in order.
/// What a worker reports with a complete or a fail.
fn execution() -> agentq::model::Execution {
    agentq::model::Execution {
        exit_code: 0,
        stdout_tail: "out".into(),
        stderr_tail: String::new(),
        duration_ms: 1,
    }
}

fn keys_of(table: &impl ReadableTable<u64, &'static [u8]>) -> Vec<u64> {
    table
        .iter()
        .unwrap()
        .map(|r| r.unwrap().0.value())
        .collect()
}

proptest! {
    // 48 cases in CI; AGENTQ_MODEL_CASES=N for a deeper run.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("AGENTQ_MODEL_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_index_counters_and_lease_cache_follow_the_rows(ops in prop::collection::vec(op(), 1..60)) {
        let mut world = World::new();
        for op in &ops {
            world.apply(op);
            world.check();
        }
        world.store().close();
    }
}
