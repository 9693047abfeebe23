//! The lease protocol over HTTP: next-task (with long-poll), complete, fail, extend-lease,
//! progress, cancel, retry, attempts, agents, peek and cleanup-leases.
//!
//! The rules themselves live in `crate::lease`; this module parses, calls the store, answers.

use std::sync::Arc;
use std::time::Duration;

use super::body::JsonBody;
use super::error::ApiResult as Result;
use poem_openapi::param::{Path, Query};
use poem_openapi::OpenApi;

use super::keys::Auth;
use super::types::*;
use super::validate::{self, Check};
use super::{ApiTags, State};
use crate::auth::Right;
use crate::error::Error;
use crate::hub::Ticket;
use crate::lease::Completion;
use crate::model::Progress;
use crate::store::write::{self, Claim, TypeKey};

pub struct LeasesApi(pub Arc<State>);

const NO_TASK: &str = "No tasks available for assignment";

/// How a holder call (complete, fail, progress) begins: the caller's right to work on the task
/// (settled in the write, see [`State::holder_check`]), its right to act as `agent`, and the
/// body's checks, begun with the agent's name.
fn holder(
    state: &State,
    auth: &Auth,
    task: &str,
    agent: &str,
) -> poem::Result<(
    impl FnOnce(&crate::model::Task) -> crate::error::Result<()> + Send + 'static,
    Check,
)> {
    let access = State::holder_check(auth, Right::Work, task)?;
    auth.caller().require_agent(agent)?;
    state.saw(agent);
    let mut c = Check::default();
    c.name("agentName", agent, validate::MAX_AGENT_NAME, "Agent name");
    Ok((access, c))
}

/// The seed's next-task body: the leased (or resumed) task, or the no-task answer.
fn next_task_answer(claim: Claim, agent: String) -> SerdeJson<NextTaskOut> {
    match claim {
        Claim::Task(t, _) => SerdeJson(NextTaskOut {
            success: true,
            error: None,
            data: NextTaskData {
                task: Some(TaskOut::new(*t, View::Leased)),
                agent_name: agent,
            },
        }),
        Claim::None => SerdeJson(NextTaskOut {
            success: false,
            error: Some(NO_TASK.to_string()),
            data: NextTaskData {
                task: None,
                agent_name: agent,
            },
        }),
    }
}

#[OpenApi]
impl LeasesApi {
    /// Resume the agent's current task in the project, or lease the best available one.
    ///
    /// With `waitSeconds`, waits (long-poll) until a task appears or the time is up.
    #[oai(
        path = "/api/agents/:agentName/next-task",
        method = "post",
        operation_id = "nextTask",
        tag = "ApiTags::Leases"
    )]
    async fn next_task(
        &self,
        auth: Auth,
        #[oai(name = "agentName")] agent: Path<String>,
        body: JsonBody<NextTaskIn>,
    ) -> Result<SerdeJson<NextTaskOut>> {
        auth.caller().require_agent(&agent.0)?;
        self.0.saw(&agent.0);
        let agent = agent.0;
        let b = body.0;
        let mut c = Check::default();
        c.name("agentName", &agent, validate::MAX_AGENT_NAME, "Agent name");
        let wait = b.wait_seconds.unwrap_or(0.0);
        c.float_range("waitSeconds", wait, &validate::WAIT_SECONDS);
        let type_keys = b
            .type_ids
            .as_deref()
            .map(|ids| checked_type_keys(&mut c, ids));
        let done = match &b.complete {
            Some(d) => Some(completion_first(&auth, &mut c, d)?),
            None => None,
        };
        c.finish(())?;
        let project = b.project_id.0;
        let type_ids = match type_keys {
            Some(keys) => Some(self.type_ids(&auth, &project, keys)?),
            None => None,
        };
        if wait <= 0.0 {
            return self.poll(&auth, project, agent, type_ids, done).await;
        }
        self.long_poll(&auth, &project, agent, type_ids, done, wait)
            .await
    }

    /// Complete a task (holder only). Repeating the same complete is answered 200.
    #[oai(
        path = "/api/tasks/:taskId/complete",
        method = "post",
        operation_id = "completeTask",
        tag = "ApiTags::Leases"
    )]
    async fn complete(
        &self,
        auth: Auth,
        #[oai(name = "taskId")] id: Path<String>,
        body: JsonBody<CompleteIn>,
    ) -> Result<Reply<TaskOut>> {
        let b = body.0;
        let (access, mut c) = holder(&self.0, &auth, &id.0, &b.agent_name)?;
        let (result, outputs, token) = validate::completion(
            &mut c,
            "",
            b.result.as_deref(),
            b.outputs.as_ref(),
            b.lease_token.as_deref(),
        );
        let done = write::Done {
            id: id.0,
            token,
            result,
            outputs,
            execution: b.execution.map(|e| validate::execution(&mut c, e)),
        };
        c.finish(())?;
        let (t, _done): (_, Completion) = self
            .0
            .store
            .write(move |w| write::complete(w, done, &b.agent_name, access))
            .await?;
        Ok(Reply::ok(TaskOut::new(t, View::Full)))
    }

    /// Fail a task (holder only): requeued with back-off while retries remain. Repeating the
    /// same fail is answered 200.
    #[oai(
        path = "/api/tasks/:taskId/fail",
        method = "post",
        operation_id = "failTask",
        tag = "ApiTags::Leases"
    )]
    async fn fail(
        &self,
        auth: Auth,
        #[oai(name = "taskId")] id: Path<String>,
        body: JsonBody<FailIn>,
    ) -> Result<Reply<FailOut>> {
        let b = body.0;
        let (access, mut c) = holder(&self.0, &auth, &id.0, &b.agent_name)?;
        let error = b.error.map_or_else(|| "failed".to_string(), String::from);
        c.max_len("error", &error, validate::MAX_ERROR);
        let failed = write::Failed {
            id: id.0,
            token: validate::lease_token(&mut c, b.lease_token.as_deref()),
            error,
            can_retry: b.can_retry.unwrap_or(true),
            execution: b.execution.map(|e| validate::execution(&mut c, e)),
        };
        c.finish(())?;
        let (t, will_retry) = self
            .0
            .store
            .write(move |w| write::fail(w, failed, &b.agent_name, access))
            .await?;
        Ok(Reply::ok(FailOut {
            task: TaskOut::new(t, View::Full),
            will_retry,
        }))
    }

    /// Heartbeat: the lease ends `extensionMinutes` from now (never earlier than before).
    #[oai(
        path = "/api/tasks/:taskId/extend-lease",
        method = "post",
        operation_id = "extendLease",
        tag = "ApiTags::Leases"
    )]
    async fn extend(
        &self,
        auth: Auth,
        #[oai(name = "taskId")] id: Path<String>,
        body: JsonBody<ExtendIn>,
    ) -> Result<Reply<TaskOut>> {
        let access = State::holder_check(&auth, Right::Work, &id.0)?;
        let b = body.0;
        let mut c = Check::default();
        let session_agent = auth.caller().session.as_ref().and_then(|s| s.agent.clone());
        let Some(agent) = b.agent_name.map(String::from).or(session_agent) else {
            // No agent name and no session: the caller cannot be the lease holder.
            return Err(Error::LeaseLost(format!(
                "task {}: name the holder in agentName (or use a session)",
                id.0
            ))
            .into());
        };
        auth.caller().require_agent(&agent)?;
        self.0.saw(&agent);
        c.name("agentName", &agent, validate::MAX_AGENT_NAME, "Agent name");
        let minutes = c.float_range(
            "extensionMinutes",
            b.extension_minutes,
            &validate::EXTENSION_MINUTES,
        );
        let token = validate::lease_token(&mut c, b.lease_token.as_deref());
        c.finish(())?;
        let ms = (minutes * 60_000.0).round() as i64;
        let t = self
            .0
            .store
            .write(move |w| write::extend(w, &id.0, &agent, token, ms, access))
            .await?;
        Ok(Reply::ok(TaskOut::new(t, View::Full)))
    }

    /// Report progress (holder only).
    #[oai(
        path = "/api/tasks/:taskId/progress",
        method = "post",
        operation_id = "reportProgress",
        tag = "ApiTags::Leases"
    )]
    async fn progress(
        &self,
        auth: Auth,
        #[oai(name = "taskId")] id: Path<String>,
        body: JsonBody<ProgressIn>,
    ) -> Result<Reply<TaskOut>> {
        let b = body.0;
        let (access, mut c) = holder(&self.0, &auth, &id.0, &b.agent_name)?;
        if b.current < 0 {
            c.fail("current", "must be 0 or more", b.current);
        }
        if b.total < 0 {
            c.fail("total", "must be 0 or more", b.total);
        }
        if let Some(m) = &b.message {
            c.max_len("message", m, validate::MAX_PROGRESS_MESSAGE);
        }
        let token = validate::lease_token(&mut c, b.lease_token.as_deref());
        c.finish(())?;
        let p = Progress {
            current: b.current,
            total: b.total,
            message: b.message.map(String::from),
        };
        let t = self
            .0
            .store
            .write(move |w| write::progress(w, &id.0, &b.agent_name, token, p, access))
            .await?;
        Ok(Reply::ok(TaskOut::new(t, View::Full)))
    }

    /// Cancel a queued or running task.
    #[oai(
        path = "/api/tasks/:taskId/cancel",
        method = "post",
        operation_id = "cancelTask",
        tag = "ApiTags::Leases"
    )]
    async fn cancel(
        &self,
        auth: Auth,
        #[oai(name = "taskId")] id: Path<String>,
        body: JsonBody<CancelIn>,
    ) -> Result<Reply<TaskOut>> {
        self.0
            .check_task(auth.caller(), Right::ManageTasks, &id.0)?;
        let reason = body.0.reason.map(String::from);
        if let Some(r) = &reason {
            let mut c = Check::default();
            c.max_len("reason", r, validate::MAX_REASON);
            c.finish(())?;
        }
        let t = self
            .0
            .store
            .write(move |w| write::cancel(w, &id.0, reason, write::no_check))
            .await?;
        Ok(Reply::ok(TaskOut::new(t, View::Full)))
    }

    /// Put a failed or cancelled task back in the queue.
    #[oai(
        path = "/api/tasks/:taskId/retry",
        method = "post",
        operation_id = "retryTask",
        tag = "ApiTags::Leases"
    )]
    async fn retry(
        &self,
        auth: Auth,
        #[oai(name = "taskId")] id: Path<String>,
    ) -> Result<Reply<TaskOut>> {
        self.0
            .check_task(auth.caller(), Right::ManageTasks, &id.0)?;
        let t = self
            .0
            .store
            .write(move |w| write::retry(w, &id.0, write::no_check))
            .await?;
        Ok(Reply::ok(TaskOut::new(t, View::Full)))
    }

    /// A task's attempt history.
    #[oai(
        path = "/api/tasks/:taskId/attempts",
        method = "get",
        operation_id = "listAttempts",
        tag = "ApiTags::Leases"
    )]
    async fn attempts(
        &self,
        auth: Auth,
        #[oai(name = "taskId")] id: Path<String>,
        limit: Query<Option<i64>>,
        offset: Query<Option<i64>>,
    ) -> Result<ListReply<AttemptOut>> {
        let (limit, offset) = validate::page(limit.0, offset.0)?;
        self.0.check_task(auth.caller(), Right::Read, &id.0)?;
        let read = self.0.store.read()?;
        let t = read.task_row(&id.0)?;
        let mut executions = read.executions(t.seq)?;
        let data = t
            .attempts
            .into_iter()
            .map(|a| AttemptOut {
                execution: executions.remove(&a.attempt).map(Into::into),
                ..a.into()
            })
            .collect();
        Ok(ListReply::page(data, limit, offset))
    }

    /// Agents currently holding a lease in the project.
    #[oai(
        path = "/api/projects/:projectId/agents",
        method = "get",
        operation_id = "listAgents",
        tag = "ApiTags::Leases"
    )]
    async fn agents(
        &self,
        auth: Auth,
        #[oai(name = "projectId")] id: Path<String>,
        limit: Query<Option<i64>>,
        offset: Query<Option<i64>>,
    ) -> Result<ListReply<AgentOut>> {
        let (limit, offset) = validate::page(limit.0, offset.0)?;
        let p = self.0.project_for(auth.caller(), Right::Read, &id.0)?;
        let r = self.0.store.read()?;
        let data: Vec<AgentOut> = r
            .leases(p.id)?
            .into_iter()
            .filter_map(|t| {
                let l = t.lease?;
                // The claim itself was a call; a restart forgets later ones.
                let seen = self.0.presence.last_seen(&l.agent).unwrap_or(0);
                Some(AgentOut {
                    task_id: t.id,
                    assigned_at: crate::time::format(l.assigned_at),
                    lease_expires_at: crate::time::format(l.expires_at),
                    last_seen_at: crate::time::format(seen.max(l.assigned_at)),
                    status: t.status.as_str().to_string(),
                    agent_name: l.agent,
                })
            })
            .collect();
        Ok(ListReply::page(data, limit, offset))
    }

    /// How many tasks next-task could hand out now.
    #[oai(
        path = "/api/projects/:projectId/peek-next-task",
        method = "get",
        operation_id = "peekNextTask",
        tag = "ApiTags::Leases"
    )]
    async fn peek(
        &self,
        auth: Auth,
        #[oai(name = "projectId")] id: Path<String>,
    ) -> Result<Reply<PeekOut>> {
        let p = self.0.project_for(auth.caller(), Right::Read, &id.0)?;
        let r = self.0.store.read()?;
        let n = if p.status == crate::model::ProjectStatus::Closed {
            0
        } else {
            r.available(p.id, self.0.store.clock.now())?
        };
        Ok(Reply::ok(PeekOut {
            project_id: uuid_str(p.id),
            tasks_available: n,
        }))
    }

    /// Reclaim the project's expired leases now.
    #[oai(
        path = "/api/projects/:projectId/cleanup-leases",
        method = "post",
        operation_id = "cleanupLeases",
        tag = "ApiTags::Leases"
    )]
    async fn cleanup(
        &self,
        auth: Auth,
        #[oai(name = "projectId")] id: Path<String>,
    ) -> Result<Reply<CleanupOut>> {
        self.0
            .project_for(auth.caller(), Right::ManageProjects, &id.0)?;
        let (tasks, agents) = self
            .0
            .store
            .write(move |w| write::cleanup_leases(w, &id.0))
            .await?;
        Ok(Reply::ok(CleanupOut {
            reclaimed_tasks: tasks as u64,
            cleaned_agents: agents as u64,
        }))
    }
}

/// next-task's `typeIds`, checked: at most [`validate::MAX_TYPE_IDS`], not empty, each a task
/// type's id or name.
fn checked_type_keys(c: &mut Check, ids: &[Text]) -> Vec<TypeKey> {
    if ids.len() > validate::MAX_TYPE_IDS {
        let most = validate::MAX_TYPE_IDS;
        c.fail("typeIds", format!("at most {most} type ids"), ids.len());
        return Vec::new();
    }
    if ids.is_empty() {
        // It would match no task, and a long-poll would wait for nothing.
        let why = "must list at least one type id; leave it out to take any task";
        c.fail("typeIds", why, serde_json::json!([]));
    }
    ids.iter()
        .enumerate()
        .map(|(i, t)| c.type_key(&format!("typeIds[{i}]"), t))
        .collect()
}

/// next-task's `complete`, checked: the completion to make before the claim, and the check
/// of the caller's right on its task that runs in the write.
fn completion_first(
    auth: &Auth,
    c: &mut Check,
    d: &CompleteFirst,
) -> Result<(
    write::Done,
    impl FnOnce(&crate::model::Task) -> crate::error::Result<()> + Send + 'static,
)> {
    let access = State::holder_check(auth, Right::Work, &d.task_id)?;
    let (result, outputs, token) = validate::completion(
        c,
        "complete.",
        d.result.as_deref(),
        d.outputs.as_ref(),
        d.lease_token.as_deref(),
    );
    let done = write::Done {
        id: d.task_id.0.clone(),
        token,
        result,
        outputs,
        execution: d.execution.clone().map(|e| validate::execution(c, e)),
    };
    Ok((done, access))
}

impl LeasesApi {
    /// next-task's `typeIds` as ids, sorted and without repeats. Names are looked up in the
    /// project (404 for a name it does not have), with one read; ids need none.
    fn type_ids(&self, auth: &Auth, project: &str, keys: Vec<TypeKey>) -> Result<Vec<u128>> {
        let mut ids = Vec::with_capacity(keys.len());
        let mut in_project = None;
        for key in keys {
            let id = match key {
                TypeKey::Id(id) => id,
                named => {
                    let p = match &in_project {
                        Some(p) => p,
                        None => in_project.insert(self.0.project_for(
                            auth.caller(),
                            Right::Work,
                            project,
                        )?),
                    };
                    self.0.type_id_in(p.id, &p.name, named)?
                }
            };
            ids.push(id);
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// next-task without a wait: one look, in one write that resolves the project itself
    /// (404 if it does not exist) and checks a scoped caller's access to it, with the same
    /// answers as `project_for` and without a read of its own.
    async fn poll<F>(
        &self,
        auth: &Auth,
        project: String,
        agent: String,
        type_ids: Option<Vec<u128>>,
        done: Option<(write::Done, F)>,
    ) -> Result<SerdeJson<NextTaskOut>>
    where
        F: FnOnce(&crate::model::Task) -> crate::error::Result<()> + Send + 'static,
    {
        let caller = auth.caller();
        if !caller.scoped() {
            caller.require(Right::Work)?;
        }
        let name = agent.clone();
        let caller = auth.caller_arc();
        let claim = self
            .0
            .store
            .write_awaited(move |w| {
                let access = |p: &crate::model::Project| {
                    caller.require_in(Right::Work, p.id, &format!("project {project}"))
                };
                write::next_task_after(w, done, &project, &name, type_ids.as_deref(), access)
            })
            .await?;
        Ok(next_task_answer(claim, agent))
    }

    /// next-task with `waitSeconds`: looks, and while it finds nothing waits for a wake-up
    /// (a task made available that it accepts), its deadline or shutdown, then looks again.
    async fn long_poll<F>(
        &self,
        auth: &Auth,
        project: &str,
        agent: String,
        type_ids: Option<Vec<u128>>,
        mut done: Option<(write::Done, F)>,
        wait: f64,
    ) -> Result<SerdeJson<NextTaskOut>>
    where
        F: FnOnce(&crate::model::Task) -> crate::error::Result<()> + Send + 'static,
    {
        let store = &self.0.store;
        let caller = auth.caller();
        let project = self.0.project_for(caller, Right::Work, project)?;
        let hub = store.hub.clone();
        // Each look checks the credential again in the write: a wait outlives a revocation.
        let key_id = caller.key_id;
        let session = caller.session.as_ref().map(|s| s.token_hash);
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(wait);
        // Counts the poll as abandoned if it is dropped (its client left) before it answers.
        let waiting = hub.waiter_guard();
        let answer = async {
            // The ticket whose wake-up the current look answers. Dropped before the look has
            // ended (the look failed, or the client left), it passes the wake-up on.
            let mut woken: Option<Ticket> = None;
            loop {
                // Queue before looking, so a task made available between the look and the wait
                // still wakes us. Leaving the loop drops the ticket (which passes on a wake-up we
                // got but did not use).
                let mut ticket = hub.wait_for(project.id, type_ids.as_deref());
                let (pid, name, ids) = (project.id, agent.clone(), type_ids.clone());
                // The completion, if any, goes with the first look only.
                let done = done.take();
                let claim = store
                    .write_awaited(move |w| {
                        crate::store::keys::credential_live(w, key_id, session.as_ref())?;
                        let key = crate::api::types::uuid_str(pid);
                        write::next_task_after(
                            w,
                            done,
                            &key,
                            &name,
                            ids.as_deref(),
                            write::no_check,
                        )
                    })
                    .await?;
                if let Some(answered) = woken.take() {
                    answered.looked();
                }
                if let Claim::Task(..) = claim {
                    return Ok(next_task_answer(claim, agent));
                }
                if tokio::time::Instant::now() >= deadline || hub.is_shutting_down() {
                    break;
                }
                tokio::select! {
                    _ = ticket.woken() => woken = Some(ticket),
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = hub.shutting_down() => break,
                }
            }
            Ok(next_task_answer(Claim::None, agent))
        }
        .await;
        waiting.answered();
        answer
    }
}
