//! The lease protocol under time and concurrency: the reaper, many agents at once.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn reaper_reclaims_expired_leases_but_never_early() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let ty = app
        .task_type(
            &p,
            json!({"name": "t", "leaseDurationMinutes": 1, "maxRetries": 1}),
        )
        .await;
    let id = app
        .task(&p, json!({"typeId": ty, "instructions": "x"}))
        .await;
    let first = app.next("a", json!({"projectId": p})).await;
    app.advance(59_999).await;
    let t = app.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(t.data()["status"], "running", "reclaimed before expiry");
    app.advance(1).await;
    let t = app.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(t.data()["status"], "queued");
    assert_eq!(t.data()["retryCount"], 1);
    assert_eq!(t.data()["attempts"][0]["outcome"], "timeout");
    assert!(t.data()["error"].as_str().unwrap().contains("expired"));

    // The stalled holder can no longer complete; a new holder of the same name with the old
    // token neither.
    let r = app
        .post(
            &format!("/api/tasks/{id}/complete"),
            json!({"agentName": "a"}),
        )
        .await;
    assert_eq!(r.code(), "LEASE_LOST");
    let second = app.next("a", json!({"projectId": p})).await;
    assert_ne!(second["leaseToken"], first["leaseToken"]);
    let r = app
        .post(
            &format!("/api/tasks/{id}/complete"),
            json!({"agentName": "a", "leaseToken": first["leaseToken"]}),
        )
        .await;
    assert_eq!(r.code(), "LEASE_LOST");

    // Out of retries: the next expiry ends the task failed.
    app.advance(60_000).await;
    let t = app.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(t.data()["status"], "failed");
    assert_eq!(t.data()["attempts"].as_array().unwrap().len(), 2);
    let s = app.stats(&p).await;
    assert_eq!(
        (s["failedTasks"].as_u64(), s["runningTasks"].as_u64()),
        (Some(1), Some(0))
    );
}

/// A step of the system clock never reclaims a lease early. Forward by an hour (an NTP step,
/// a VM restored from a snapshot), every lease looks expired on the wall clock, but each still
/// runs its real minute, and `cleanup-leases` takes none early either. Back by an hour, a
/// lease taken before the step is reclaimed when the wall clock reaches its expiry again (an
/// hour late, which loses nothing: its holder may still complete), while a lease taken after
/// the step expires on time.
#[tokio::test]
async fn a_step_of_the_wall_clock_reclaims_no_lease_early() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let (ty, id) = app.minute_task(&p).await;
    let status = |id: String| {
        let app = &app;
        async move { app.get(&format!("/api/tasks/{id}")).await.data()["status"].clone() }
    };
    app.next("a", json!({"projectId": p})).await;
    app.advance(30_000).await;
    app.step_wall_clock(3_600_000).await;
    assert_eq!(
        status(id.clone()).await,
        "running",
        "reclaimed by a clock step"
    );
    // The writer saw the step (no other test of this binary steps the clock).
    assert_eq!(app.metric("agentq_clock_steps_total").await, 1.0);
    let cleaned = app
        .post(&format!("/api/projects/{p}/cleanup-leases"), json!({}))
        .await;
    assert_eq!(cleaned.status, 200, "{:?}", cleaned.body);
    assert_eq!(
        status(id.clone()).await,
        "running",
        "cleaned up by a clock step"
    );
    app.advance(29_999).await;
    assert_eq!(
        status(id.clone()).await,
        "running",
        "reclaimed before its minute"
    );
    app.advance(1).await;
    assert_eq!(status(id.clone()).await, "queued", "its minute ran out");

    // Back by an hour: the lease taken before the step waits for its wall-clock expiry, a
    // lease taken after it is reclaimed on time, before the older one.
    let later = app
        .task(&p, json!({"typeId": ty, "instructions": "later"}))
        .await;
    let held = app.next("a", json!({"projectId": p})).await;
    assert_eq!(held["id"], id.as_str());
    app.step_wall_clock(-3_600_000).await;
    app.advance(1_000).await;
    let next = app.next("b", json!({"projectId": p})).await;
    // Seen at the writer's next batch, this claim's.
    assert_eq!(app.metric("agentq_clock_steps_total").await, 2.0);
    assert_eq!(next["id"], later.as_str());
    app.advance(60_000).await;
    assert_eq!(
        status(later.clone()).await,
        "queued",
        "the later lease ran out on time"
    );
    assert_eq!(
        status(id.clone()).await,
        "running",
        "reclaimed while the wall clock says not"
    );
    app.advance(3_600_000 - 61_000 + 59_999).await;
    assert_eq!(status(id.clone()).await, "running");
    app.advance(1).await;
    assert_eq!(status(id.clone()).await, "queued");
}

/// After the wall clock stepped back with more leases out than the reaper's look-ahead walks
/// (256), its estimate of the next lease due is early for as long as the step: the passes
/// that find nothing due back off (50 ms, doubling to 1 s) rather than run 20 times a second,
/// and none reclaims a lease. Checked by counting passes and reading the pause, so the
/// machine's speed cannot change the answer.
#[tokio::test]
async fn after_a_step_back_the_reapers_empty_passes_back_off() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let (ty, _) = app.minute_task(&p).await;
    let tasks: Vec<Value> = (0..300)
        .map(|i| json!({"typeId": ty, "instructions": format!("t{i}")}))
        .collect();
    app.bulk(&p, &tasks).await;
    for i in 0..301 {
        app.next(&format!("a{i}"), json!({"projectId": p})).await;
    }
    app.step_wall_clock(-3_600_000).await;
    // Past every lease's minute on the steady clock, an hour before any expiry on the wall.
    app.advance(61_000).await;
    // A new lease, which expires before the old ones on the wall clock, wakes the reaper; the
    // writer's estimate of the next lease due is now early (past the 256 it walks).
    app.task(&p, json!({"typeId": ty, "instructions": "new"}))
        .await;
    app.next("b", json!({"projectId": p})).await;
    let store = app.server.as_ref().unwrap().store.clone();
    let unwritten = || {
        store
            .batches
            .unwritten
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Counted in passes, not in time: the pause doubles from 50 ms at each empty pass in a row
    // and reaches its longest, 1 s, at the sixth (a fixed pause would stay at 50 ms).
    let before = unwritten();
    let hub = store.hub.clone();
    let pause = eventually(
        std::time::Duration::from_secs(30),
        || {
            let hub = hub.clone();
            async move { hub.empty_pause_ms() }
        },
        |ms| *ms == 1000,
    )
    .await;
    let passes = unwritten() - before;
    assert_eq!(pause, 1000, "the pause after {passes} empty passes");
    assert!(passes > 0, "the passes are the writer's empty batches");
    assert_eq!(app.stats(&p).await["runningTasks"], 302);
}

/// A repeated complete is answered 200 so that an agent can retry it over a flaky network;
/// but it answered 200 also to a stalled process whose lease had been reclaimed and whose task
/// a new process of the same agent name then completed: the stale process was told its result
/// was taken, though it was dropped. A repeat with a token is now accepted only with the token
/// of the lease that completed the task.
#[tokio::test]
async fn a_stale_token_cannot_repeat_a_complete_made_under_a_later_lease() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let (_, id) = app.minute_task(&p).await;
    let stale = app.next("a", json!({"projectId": p})).await;
    app.advance(60_000).await;
    let fresh = app.next("a", json!({"projectId": p})).await;
    assert_eq!(fresh["id"], id.as_str());
    let path = format!("/api/tasks/{id}/complete");
    let complete = |token: &Value, result: &str| {
        app.post(
            &path,
            json!({"agentName": "a", "leaseToken": token, "result": result}),
        )
    };
    assert_eq!(complete(&fresh["leaseToken"], "fresh").await.status, 200);
    let late = complete(&stale["leaseToken"], "stale").await;
    assert_eq!((late.status, late.code()), (409, "LEASE_LOST"));
    let again = complete(&fresh["leaseToken"], "fresh").await;
    assert_eq!(again.status, 200, "the same complete, repeated");
    assert_eq!(again.data()["result"], "fresh");
    let no_token = app.post(&path, json!({"agentName": "a"})).await;
    assert_eq!(
        no_token.status, 200,
        "without a token the agent name decides"
    );
    let other = app.post(&path, json!({"agentName": "b"})).await;
    assert_eq!(other.code(), "LEASE_LOST");
}

#[tokio::test]
async fn an_earlier_lease_wakes_the_sleeping_reaper() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let long = app
        .task_type(&p, json!({"name": "long", "leaseDurationMinutes": 60}))
        .await;
    let short = app
        .task_type(&p, json!({"name": "short", "leaseDurationMinutes": 1}))
        .await;
    app.task(&p, json!({"typeId": long, "instructions": "x"}))
        .await;
    app.next("a", json!({"projectId": p})).await;
    let id = app
        .task(&p, json!({"typeId": short, "instructions": "y"}))
        .await;
    app.next("b", json!({"projectId": p})).await;
    app.advance(60_000).await;
    let t = app.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(t.data()["status"], "queued");
    let s = app.stats(&p).await;
    assert_eq!(s["runningTasks"], 1);
}

#[tokio::test]
async fn extend_keeps_the_reaper_away() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let (_, id) = app.minute_task(&p).await;
    app.next("a", json!({"projectId": p})).await;
    app.advance(50_000).await;
    app.post(
        &format!("/api/tasks/{id}/extend-lease"),
        json!({"agentName": "a", "extensionMinutes": 1}),
    )
    .await;
    app.advance(50_000).await;
    assert_eq!(
        app.get(&format!("/api/tasks/{id}")).await.data()["status"],
        "running"
    );
    app.advance(10_000).await;
    assert_eq!(
        app.get(&format!("/api/tasks/{id}")).await.data()["status"],
        "queued"
    );
}

/// 48 agents race over 2,400 tasks: each task is completed exactly once, and no two agents
/// ever hold the same task at the same time (checked by a shared holder table that every
/// agent updates between its claim and its complete).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_agents_complete_each_task_exactly_once() {
    const AGENTS: usize = 48;
    const TASKS: usize = 2400;
    let app = Arc::new(spawn_app().await);
    let p = app.project("p").await;
    let tasks: Vec<Value> = (0..TASKS)
        .map(|i| json!({"instructions": format!("t{i}"), "priority": i % 11}))
        .collect();
    app.bulk(&p, &tasks).await;
    let holders: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let completed: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut handles = Vec::new();
    for n in 0..AGENTS {
        let (app, p, holders, completed) =
            (app.clone(), p.clone(), holders.clone(), completed.clone());
        handles.push(tokio::spawn(async move {
            let agent = format!("agent-{n}");
            loop {
                let t = app.next(&agent, json!({"projectId": p})).await;
                if t.is_null() {
                    break;
                }
                let id = t["id"].as_str().unwrap().to_string();
                if let Some(other) = holders.lock().unwrap().insert(id.clone(), agent.clone()) {
                    panic!("task {id} held by {other} and {agent} at once");
                }
                let r = app
                    .post(
                        &format!("/api/tasks/{id}/complete"),
                        json!({"agentName": agent, "result": "ok", "leaseToken": t["leaseToken"]}),
                    )
                    .await;
                assert_eq!(r.status, 200, "{:?}", r.body);
                holders.lock().unwrap().remove(&id);
                completed.lock().unwrap().push(id);
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let done = completed.lock().unwrap().clone();
    let unique: HashSet<&String> = done.iter().collect();
    assert_eq!(done.len(), TASKS, "completes");
    assert_eq!(unique.len(), TASKS, "each task once");
    let s = app.stats(&p).await;
    assert_eq!(s["completedTasks"], TASKS as u64);
    assert_eq!(s["runningTasks"], 0);
    assert_eq!(s["queuedTasks"], 0);
    let listed = app
        .get(&format!("/api/projects/{p}/tasks?status=completed&createdAfter=2000-01-01T00:00:00.000Z&limit=1"))
        .await;
    assert_eq!(listed.body["pagination"]["total"], TASKS as u64);
}

/// Agents race while leases run out under them: the clock jumps half a lease at a time, some
/// agents stall past their lease and answer late, some fail. Whatever the interleaving, each
/// task's history is one attempt after another, ending in the one complete that counted (by
/// the holder of its last lease) or in running out of retries, and a late answer on a
/// reclaimed lease gets `LEASE_LOST`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiring_leases_never_let_two_agents_finish_one_task() {
    const AGENTS: usize = 12;
    const TASKS: usize = 120;
    let app = Arc::new(spawn_with_manual_clock().await);
    let p = app.project("p").await;
    let ty = app
        .task_type(
            &p,
            json!({"name": "t", "leaseDurationMinutes": 1, "maxRetries": 10,
                   "retryDelaySeconds": 1, "backoffMultiplier": 1}),
        )
        .await;
    let tasks: Vec<Value> = (0..TASKS)
        .map(|i| json!({"typeId": ty, "instructions": format!("t{i}")}))
        .collect();
    app.bulk(&p, &tasks).await;
    // (task, lease token) of every lease handed out, and of every complete answered 200.
    let leases: Arc<Mutex<HashSet<(String, String)>>> = Arc::default();
    let completed: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let lost = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clock = {
        let (app, done) = (app.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
                app.advance(30_000).await;
            }
        })
    };
    let mut handles = Vec::new();
    for n in 0..AGENTS {
        let (app, p, leases, completed, lost) = (
            app.clone(),
            p.clone(),
            leases.clone(),
            completed.clone(),
            lost.clone(),
        );
        handles.push(tokio::spawn(async move {
            let agent = format!("agent-{n}");
            let mut round = 0usize;
            loop {
                round += 1;
                let t = app.next(&agent, json!({"projectId": p})).await;
                if t.is_null() {
                    let s = app.stats(&p).await;
                    let ended =
                        s["completedTasks"].as_u64().unwrap() + s["failedTasks"].as_u64().unwrap();
                    if ended == TASKS as u64 {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    continue;
                }
                let (id, token) = (
                    t["id"].as_str().unwrap().to_string(),
                    t["leaseToken"].as_str().unwrap().to_string(),
                );
                leases.lock().unwrap().insert((id.clone(), token.clone()));
                // Some agents stall until the clock is past their lease (the reaper then
                // reclaims it; another agent may hold the task by the time they answer).
                if (n + round).is_multiple_of(3) {
                    use agentq::time::Clock;
                    let clock = app.clock.as_ref().unwrap();
                    let past = clock.now() + 90_000;
                    while clock.now() < past {
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    }
                }
                let fail = (n + round).is_multiple_of(4);
                let mut body = json!({"agentName": agent, "leaseToken": token});
                if fail {
                    body["error"] = json!("e");
                }
                let path = if fail { "fail" } else { "complete" };
                let r = app.post(&format!("/api/tasks/{id}/{path}"), body).await;
                match r.status {
                    200 if path == "complete" => completed.lock().unwrap().push((id, token)),
                    200 => {}
                    409 => {
                        assert_eq!(r.code(), "LEASE_LOST", "{:?}", r.body);
                        lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    s => panic!("{path} answered {s}: {:?}", r.body),
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    clock.await.unwrap();

    let completed = completed.lock().unwrap().clone();
    let leases = leases.lock().unwrap().clone();
    let mut by_task: HashMap<String, String> = HashMap::new();
    for (id, token) in &completed {
        if let Some(other) = by_task.insert(id.clone(), token.clone()) {
            panic!("task {id} completed under two leases: {other} and {token}");
        }
    }
    let all = app
        .get(&format!("/api/projects/{p}/tasks?limit=1000"))
        .await;
    let all = all.data().as_array().unwrap().clone();
    assert_eq!(all.len(), TASKS);
    let mut timeouts = 0;
    for t in &all {
        let id = t["id"].as_str().unwrap();
        let status = t["status"].as_str().unwrap();
        let attempts = app.get(&format!("/api/tasks/{id}/attempts")).await;
        let attempts = attempts.data().as_array().unwrap().clone();
        let handed = leases.iter().filter(|(t, _)| t == id).count();
        assert_eq!(attempts.len(), handed, "one attempt per lease handed out");
        // Completed by its last lease's holder, or out of retries: never both.
        assert_eq!(
            status == "completed",
            by_task.contains_key(id),
            "{id} {status}"
        );
        assert!(matches!(status, "completed" | "failed"), "{id} {status}");
        for (i, a) in attempts.iter().enumerate() {
            let last = i + 1 == attempts.len();
            let outcome = a["outcome"].as_str().unwrap();
            timeouts += (outcome == "timeout") as usize;
            assert_eq!(
                outcome == "completed",
                last && status == "completed",
                "task {id}: attempt {i} of {} ended {outcome}",
                attempts.len()
            );
            if outcome != "completed" {
                assert!(
                    matches!(outcome, "failed" | "timeout"),
                    "{id} attempt {i}: {outcome}"
                );
            }
            if !last {
                let (end, next) = (&a["endedAt"], &attempts[i + 1]["startedAt"]);
                assert!(
                    end.as_str().unwrap() <= next.as_str().unwrap(),
                    "task {id}: attempt {i} ended at {end}, after the next began at {next}"
                );
            }
        }
    }
    let s = app.stats(&p).await;
    assert_eq!(s["completedTasks"], by_task.len() as u64);
    assert_eq!(s["runningTasks"], 0);
    assert!(
        by_task.len() > TASKS / 2,
        "most tasks complete: {}",
        by_task.len()
    );
    // The run did what it is for: leases ran out under agents, and late answers were refused.
    let lost = lost.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{timeouts} leases ran out, {lost} late answers refused");
    assert!(
        timeouts > 0 && lost > 0,
        "{timeouts} timeouts, {lost} refused"
    );
}

/// next-task with `complete`: the agent's whole cycle in one request. The task is completed
/// as `complete` would complete it and the next one is handed out; repeating the request
/// (a lost answer) resumes that next task; a completion that `complete` would refuse is
/// refused and nothing is claimed.
#[tokio::test]
async fn next_task_can_complete_the_previous_task_first() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let ids: Vec<String> = tasks_in_order(&app, &p, 4).await;
    let first = app.next("a", json!({"projectId": p})).await;
    assert_eq!(first["id"], ids[0].as_str());
    let token = first["leaseToken"].as_str().unwrap().to_string();
    let cycle = json!({"projectId": p, "complete": {
        "taskId": ids[0], "result": "done", "outputs": {"n": 1}, "leaseToken": token}});
    let second = app.next("a", cycle.clone()).await;
    assert_eq!(second["id"], ids[1].as_str());
    let done = app.get(&format!("/api/tasks/{}", ids[0])).await;
    assert_eq!(done.data()["status"], "completed");
    assert_eq!(done.data()["result"], "done");
    assert_eq!(done.data()["outputs"], json!({"n": 1}));
    // The answer was lost and the agent asks again: same next task, one completion.
    let again = app.next("a", cycle).await;
    assert_eq!(again["id"], ids[1].as_str());
    assert_eq!(again["leaseToken"], second["leaseToken"]);
    let s = app.stats(&p).await;
    assert_eq!(
        (s["completedTasks"].clone(), s["runningTasks"].clone()),
        (json!(1), json!(1))
    );

    // Refused as complete refuses: another agent, a stale token, an unknown task.
    for (agent, complete, status, code) in [
        ("b", json!({"taskId": ids[1]}), 409, "LEASE_LOST"),
        (
            "a",
            json!({"taskId": ids[1], "leaseToken": token}),
            409,
            "LEASE_LOST",
        ),
        ("a", json!({"taskId": "nope"}), 404, "NOT_FOUND"),
        (
            "a",
            json!({"taskId": ids[1], "outputs": [1]}),
            400,
            "VALIDATION_ERROR",
        ),
        (
            "a",
            json!({"taskId": ids[1], "leaseToken": "xyz"}),
            400,
            "VALIDATION_ERROR",
        ),
        (
            "a",
            json!({"taskId": ids[1], "extra": 1}),
            400,
            "VALIDATION_ERROR",
        ),
    ] {
        let r = app
            .post(
                &format!("/api/agents/{agent}/next-task"),
                json!({"projectId": p, "complete": complete}),
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (status, code),
            "{complete}: {:?}",
            r.body
        );
    }
    let bad = app
        .post(
            "/api/agents/a/next-task",
            json!({"projectId": p, "complete": {"taskId": ids[1], "outputs": 5}}),
        )
        .await;
    assert_eq!(
        bad.body["validationDetails"][0]["field"],
        "complete.outputs"
    );
    let s = app.stats(&p).await;
    assert_eq!(
        (s["completedTasks"].clone(), s["runningTasks"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(
        s["queuedTasks"], 2,
        "nothing was claimed by a refused request"
    );

    // With a long-poll, and until the queue is empty: the last completion is kept even though
    // no task follows it.
    let third = app
        .next(
            "a",
            json!({"projectId": p, "waitSeconds": 5, "complete": {"taskId": ids[1]}}),
        )
        .await;
    assert_eq!(third["id"], ids[2].as_str());
    let fourth = app
        .next("a", json!({"projectId": p, "complete": {"taskId": ids[2]}}))
        .await;
    assert_eq!(fourth["id"], ids[3].as_str());
    let none = app
        .post(
            "/api/agents/a/next-task",
            json!({"projectId": p, "complete": {"taskId": ids[3]}}),
        )
        .await;
    assert_eq!(none.status, 200);
    assert_eq!(none.body["success"], false);
    assert_eq!(none.data()["task"], Value::Null);
    let s = app.stats(&p).await;
    assert_eq!(s["completedTasks"], 4);
    assert_eq!(s["runningTasks"], 0);
}

/// A key limited to one project cannot complete another project's task through next-task
/// in its own: the task is out of its sight (404), and nothing is claimed.
#[tokio::test]
async fn next_task_completes_only_tasks_in_the_callers_scope() {
    let app = spawn_app().await;
    let mine = app.project("mine").await;
    let theirs = app.project("theirs").await;
    let other = app.task(&theirs, json!({"instructions": "x"})).await;
    app.task(&mine, json!({"instructions": "y"})).await;
    assert_eq!(
        app.next("a", json!({"projectId": theirs})).await["id"],
        other.as_str()
    );
    let (_, key) = app.key("agent", Some(vec![&mine])).await;
    let scoped = client_with_key(&key);
    let r = app
        .call_with(
            &scoped,
            "POST",
            "/api/agents/a/next-task",
            Some(json!({"projectId": mine, "complete": {"taskId": other}})),
        )
        .await;
    assert_eq!((r.status, r.code()), (404, "NOT_FOUND"), "{:?}", r.body);
    assert_eq!(app.stats(&theirs).await["runningTasks"], 1);
    assert_eq!(app.stats(&mine).await["queuedTasks"], 1);
}

/// `n` tasks in `project`, created one after another (so they are handed out in this order).
async fn tasks_in_order(app: &TestApp, project: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            app.task(project, json!({"instructions": format!("t{i}")}))
                .await,
        );
    }
    ids
}

/// Producers and agents at once over HTTP: bulk creates, cancels, retries (with a `{}` body
/// the operation does not take), updates (`notBefore` cleared with `null`, priorities) and
/// deletes, beside claims, completes, fails and extends. Nothing answers 5xx and no request
/// fails, and afterwards the counters equal the listing totals and a walk of every task, and
/// each running task, and only those, holds a lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_and_agents_at_once_keep_the_counts_exact() {
    use std::time::{Duration, Instant};
    let app = spawn_app().await;
    let p = app.project("mixed").await;
    let ids: Arc<Mutex<Vec<String>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut workers = Vec::new();
    for agent in 0..8u64 {
        let (client, base, p) = (app.client.clone(), app.base.clone(), p.clone());
        workers.push(tokio::spawn(async move {
            let name = format!("agent-{agent}");
            let mut turn = agent;
            while Instant::now() < deadline {
                turn += 1;
                let url = format!("{base}/api/agents/{name}/next-task");
                let r = client.post(url).json(&json!({"projectId": p})).send().await;
                let answer: Value = r.unwrap().json().await.unwrap();
                if answer["success"] != true {
                    continue;
                }
                let task = &answer["data"]["task"];
                let (id, token) = (task["id"].as_str().unwrap(), &task["leaseToken"]);
                let holder = json!({"agentName": name, "leaseToken": token});
                let (op, mut body) = match turn % 10 {
                    0..=5 => ("complete", holder),
                    6 | 7 => ("fail", holder),
                    8 => ("extend-lease", holder),
                    _ => continue, // left to expire
                };
                if op == "extend-lease" {
                    body["extensionMinutes"] = json!(1);
                }
                let url = format!("{base}/api/tasks/{id}/{op}");
                let status = client.post(url).json(&body).send().await.unwrap().status();
                assert!(status.as_u16() < 500, "{op}: {status}");
            }
        }));
    }
    for producer in 0..2u64 {
        let (client, base, p, ids) = (app.client.clone(), app.base.clone(), p.clone(), ids.clone());
        workers.push(tokio::spawn(async move {
            let mut turn = producer;
            while Instant::now() < deadline {
                turn += 1;
                if turn % 3 == 0 {
                    let tasks: Vec<Value> = (0..10)
                        .map(|i| json!({"instructions": "x", "priority": (turn + i) % 11}))
                        .collect();
                    let url = format!("{base}/api/projects/{p}/tasks/bulk");
                    let r = client.post(url).json(&json!({"tasks": tasks})).send().await;
                    let created: Value = r.unwrap().json().await.unwrap();
                    let new = created["data"]["createdTasks"].as_array().unwrap();
                    let mut ids = ids.lock().unwrap();
                    ids.extend(new.iter().map(|t| t["id"].as_str().unwrap().to_string()));
                    continue;
                }
                let id = {
                    let ids = ids.lock().unwrap();
                    match ids.len() {
                        0 => continue,
                        n => ids[(turn as usize * 7919) % n].clone(),
                    }
                };
                let task = format!("{base}/api/tasks/{id}");
                let request = match turn % 5 {
                    0 => client.post(format!("{task}/cancel")).json(&json!({})),
                    1 => client.post(format!("{task}/retry")).json(&json!({})),
                    2 => client.put(&task).json(&json!({"notBefore": null})),
                    3 => client.put(&task).json(&json!({"priority": 3})),
                    _ => client.delete(&task),
                };
                let status = request.send().await.unwrap().status();
                assert!(status.as_u16() < 500, "{status}");
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let stats = app.stats(&p).await;
    let mut walked: HashMap<String, u64> = HashMap::new();
    let mut cursor = String::new();
    loop {
        let page = app
            .get(&format!("/api/projects/{p}/tasks?limit=1000{cursor}"))
            .await;
        for t in page.data().as_array().unwrap() {
            let running = t["status"] == "running";
            assert_eq!(t["assignedTo"].is_string(), running, "{t}");
            assert_eq!(t["leaseExpiresAt"].is_string(), running, "{t}");
            *walked
                .entry(t["status"].as_str().unwrap().into())
                .or_default() += 1;
        }
        match page.body["pagination"]["nextCursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    assert!(stats["totalTasks"].as_u64().unwrap() > 0);
    assert_eq!(walked.values().sum::<u64>(), stats["totalTasks"]);
    for status in ["queued", "running", "completed", "failed", "cancelled"] {
        let listed = app
            .get(&format!("/api/projects/{p}/tasks?status={status}&limit=1"))
            .await;
        let counted = &stats[format!("{status}Tasks")];
        assert_eq!(&listed.body["pagination"]["total"], counted, "{status}");
        assert_eq!(
            walked.get(status).copied().unwrap_or(0),
            *counted,
            "{status}"
        );
    }
}

/// On the real clock the reaper sleeps until the next lease falls due and reclaims it then
/// (the other tests move a manual clock, which wakes the reaper itself). A 6-second lease is
/// back in the queue well within 30 s, never before its expiry.
#[tokio::test]
async fn on_the_real_clock_the_reaper_wakes_when_a_lease_falls_due() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let t = app
        .task_type(&p, json!({"name": "short", "leaseDurationMinutes": 0.1}))
        .await;
    let id = app
        .task(&p, json!({"typeId": t, "instructions": "x"}))
        .await;
    let started = std::time::Instant::now();
    let held = app.next("a", json!({"projectId": p})).await;
    assert_eq!(held["id"], id.as_str());
    let status = || async {
        let task = app.get(&format!("/api/tasks/{id}")).await;
        task.data()["status"].as_str().unwrap().to_string()
    };
    let limit = std::time::Duration::from_secs(30);
    let status = eventually(limit, status, |s| s != "running").await;
    assert_eq!(status, "queued", "the lease was not reclaimed within 30 s");
    assert!(started.elapsed() >= std::time::Duration::from_secs(6));
    let attempts = app.get(&format!("/api/tasks/{id}/attempts")).await;
    assert_eq!(
        attempts.data()[0]["outcome"],
        "timeout",
        "{:?}",
        attempts.body
    );
}
