//! Tasks: create, bulk, list, read, update, delete.

use std::sync::Arc;

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
use crate::store::read::{Cursor, Sort, TaskQuery};
use crate::store::write;

pub struct TasksApi(pub Arc<State>);

#[OpenApi]
impl TasksApi {
    /// List a project's tasks with filters, sorting and cursor paging.
    #[oai(
        path = "/api/projects/:projectId/tasks",
        method = "get",
        operation_id = "listTasks",
        tag = "ApiTags::Tasks"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        auth: Auth,
        #[oai(name = "projectId")] id: Path<String>,
        /// One status or a comma-separated list.
        status: Query<Option<String>>,
        /// Only tasks of this type, by id or by its name in the project.
        #[oai(name = "typeId")]
        type_id: Query<Option<String>>,
        #[oai(name = "assignedTo")] assigned_to: Query<Option<String>>,
        #[oai(name = "batchId")] batch_id: Query<Option<String>>,
        /// Tasks created strictly after this instant.
        #[oai(name = "createdAfter")]
        created_after: Query<Option<String>>,
        /// Tasks created strictly before this instant.
        #[oai(name = "createdBefore")]
        created_before: Query<Option<String>>,
        /// Only tasks of this priority (0-10).
        priority: Query<Option<i64>>,
        /// Tasks last changed strictly after this instant.
        #[oai(name = "updatedAfter")]
        updated_after: Query<Option<String>>,
        /// Tasks last changed strictly before this instant.
        #[oai(name = "updatedBefore")]
        updated_before: Query<Option<String>>,
        /// `createdAt` (default), `updatedAt` or `priority`.
        sort: Query<Option<SortBy>>,
        /// `desc` (default) or `asc`.
        order: Query<Option<SortOrder>>,
        limit: Query<Option<i64>>,
        offset: Query<Option<i64>>,
        /// `pagination.nextCursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<ListReply<TaskOut>> {
        let project = self.0.project_for(auth.caller(), Right::Read, &id.0)?;
        let mut c = Check::default();
        let statuses = status
            .0
            .as_deref()
            .map_or_else(Vec::new, |s| validate::status_list(&mut c, s));
        let type_key = type_id.0.as_deref().map(|t| c.type_key("typeId", t));
        let created_after = created_after
            .0
            .as_deref()
            .and_then(|t| c.time("createdAfter", t));
        let created_before = created_before
            .0
            .as_deref()
            .and_then(|t| c.time("createdBefore", t));
        let priority = priority
            .0
            .map(|p| c.int_range("priority", p, &validate::PRIORITY) as u8);
        let updated_after = updated_after
            .0
            .as_deref()
            .and_then(|t| c.time("updatedAfter", t));
        let updated_before = updated_before
            .0
            .as_deref()
            .and_then(|t| c.time("updatedBefore", t));
        let sort = match sort.0.unwrap_or_default() {
            SortBy::CreatedAt => Sort::CreatedAt,
            SortBy::UpdatedAt => Sort::UpdatedAt,
            SortBy::Priority => Sort::Priority,
        };
        let desc = order.0.unwrap_or_default() == SortOrder::Desc;
        let cursor = cursor.0.as_deref().and_then(|s| {
            let cur = Cursor::decode(s);
            if cur.is_none() {
                c.fail("cursor", "not a cursor from pagination.nextCursor", s);
            }
            cur
        });
        let (limit, offset) = validate::paging(&mut c, limit.0, offset.0);
        c.finish(())?;
        let type_id = match type_key {
            Some(key) => Some(self.0.type_id_in(project.id, &project.name, key)?),
            None => None,
        };
        let q = TaskQuery {
            statuses,
            type_id,
            assigned_to: assigned_to.0,
            batch_id: batch_id.0,
            created_after,
            created_before,
            priority,
            updated_after,
            updated_before,
            sort,
            desc,
            limit,
            offset,
            cursor,
        };
        let store = self.0.store.clone();
        let page = tokio::task::spawn_blocking(move || store.read()?.list_tasks(project.id, &q))
            .await
            .map_err(|e| Error::Storage(e.to_string()))??;
        let data = page
            .tasks
            .into_iter()
            .map(|t| TaskOut::new(t, View::Brief))
            .collect();
        Ok(ListReply::new(
            data,
            page.total,
            limit,
            offset,
            page.next.map(Cursor::encode),
        ))
    }

    /// Create a task. With `duplicateHandling: ignore`, an existing duplicate is returned (200).
    #[oai(
        path = "/api/projects/:projectId/tasks",
        method = "post",
        operation_id = "createTask",
        tag = "ApiTags::Tasks"
    )]
    async fn create(
        &self,
        auth: Auth,
        #[oai(name = "projectId")] id: Path<String>,
        body: JsonBody<CreateTask>,
    ) -> Result<TaskCreated> {
        self.0
            .project_for(auth.caller(), Right::ManageTasks, &id.0)?;
        if body.0.script.is_some() {
            auth.caller().require_scripts()?;
        }
        let input = validate::create_task(body.0, None, "")?;
        let mut out = self
            .0
            .store
            .write(move |w| write::create_tasks(w, &id.0, vec![input]))
            .await?;
        let (task, created) = out.pop().expect("one result per task")?;
        Ok(TaskCreated::new(TaskOut::new(task, View::Full), created))
    }

    /// Create up to 1000 tasks in one transaction; per-task problems are reported by index.
    #[oai(
        path = "/api/projects/:projectId/tasks/bulk",
        method = "post",
        operation_id = "createTasksInBulk",
        tag = "ApiTags::Tasks"
    )]
    async fn bulk(
        &self,
        auth: Auth,
        #[oai(name = "projectId")] id: Path<String>,
        body: JsonBody<BulkCreate>,
    ) -> Result<CreatedReply<BulkOut>> {
        self.0
            .project_for(auth.caller(), Right::ManageTasks, &id.0)?;
        let BulkCreate { tasks, batch_id } = body.0;
        if tasks.iter().any(|t| t.script.is_some()) {
            // Who may write code for workers is a property of the request, not of one task.
            auth.caller().require_scripts()?;
        }
        let batch_id = batch_id.map(String::from);
        if tasks.len() > validate::MAX_BULK {
            return Err(Error::validation(
                "tasks",
                format!("at most {} tasks per request", validate::MAX_BULK),
            )
            .into());
        }
        if let Some(b) = &batch_id {
            let mut c = Check::default();
            c.max_len("batchId", b, validate::MAX_BATCH_ID);
            c.finish(())?;
        }
        let mut errors = Vec::new();
        let mut valid = Vec::with_capacity(tasks.len());
        let mut index = Vec::with_capacity(tasks.len());
        for (i, t) in tasks.into_iter().enumerate() {
            match validate::create_task(t, batch_id.as_ref(), &format!("tasks[{i}].")) {
                Ok(n) => {
                    valid.push(n);
                    index.push(i);
                }
                Err(e) => errors.push(BulkError {
                    index: i as u64,
                    error: e.to_string(),
                }),
            }
        }
        let results = self
            .0
            .store
            .write(move |w| write::create_tasks(w, &id.0, valid))
            .await?;
        let mut created = Vec::new();
        for (i, r) in index.into_iter().zip(results) {
            match r {
                Ok((t, true)) => created.push(TaskOut::new(t, View::Brief)),
                Ok((t, false)) => errors.push(BulkError {
                    index: i as u64,
                    error: format!("duplicate of existing task {} (ignored)", t.id),
                }),
                Err(e) => errors.push(BulkError {
                    index: i as u64,
                    error: e.to_string(),
                }),
            }
        }
        errors.sort_by_key(|e| e.index);
        Ok(CreatedReply::created(BulkOut {
            tasks_created: created.len() as u64,
            created_tasks: created,
            errors,
        }))
    }

    /// Get a task with its attempts and outputs.
    #[oai(
        path = "/api/tasks/:taskId",
        method = "get",
        operation_id = "getTask",
        tag = "ApiTags::Tasks"
    )]
    async fn get(
        &self,
        auth: Auth,
        #[oai(name = "taskId")] id: Path<String>,
    ) -> Result<Reply<TaskOut>> {
        self.0.check_task(auth.caller(), Right::Read, &id.0)?;
        let t = self.0.store.read()?.task(&id.0)?;
        Ok(Reply::ok(TaskOut::new(t, View::Full)))
    }

    /// Update a queued task; new variables re-render its instructions from the template.
    #[oai(
        path = "/api/tasks/:taskId",
        method = "put",
        operation_id = "updateTask",
        tag = "ApiTags::Tasks"
    )]
    async fn update(
        &self,
        auth: Auth,
        #[oai(name = "taskId")] id: Path<String>,
        body: JsonBody<UpdateTask>,
    ) -> Result<Reply<TaskOut>> {
        self.0
            .check_task(auth.caller(), Right::ManageTasks, &id.0)?;
        let patch = validate::update_task(body.0)?;
        let t = self
            .0
            .store
            .write(move |w| write::update_task(w, &id.0, patch))
            .await?;
        Ok(Reply::ok(TaskOut::new(t, View::Full)))
    }

    /// Delete a task (a running task's lease goes with it).
    #[oai(
        path = "/api/tasks/:taskId",
        method = "delete",
        operation_id = "deleteTask",
        tag = "ApiTags::Tasks"
    )]
    async fn delete(
        &self,
        auth: Auth,
        #[oai(name = "taskId")] id: Path<String>,
    ) -> Result<Reply<Deleted>> {
        self.0
            .check_task(auth.caller(), Right::ManageTasks, &id.0)?;
        let key = id.0.clone();
        self.0
            .store
            .write(move |w| write::delete_task(w, &key))
            .await?;
        Ok(Reply::ok(Deleted {
            deleted: true,
            id: id.0,
        }))
    }

    /// Delete every task of a project that matches: finished tasks (completed, failed,
    /// cancelled) unless `status` names others, ended before `endedBefore`, of a type, of a
    /// batch. Deleted in chunks of 250, each its own transaction; answers how many.
    #[oai(
        path = "/api/projects/:projectId/tasks",
        method = "delete",
        operation_id = "deleteTasks",
        tag = "ApiTags::Tasks"
    )]
    async fn purge(
        &self,
        auth: Auth,
        #[oai(name = "projectId")] id: Path<String>,
        /// One status or a comma-separated list; queued and running tasks only when named.
        /// Default: completed,failed,cancelled.
        status: Query<Option<String>>,
        /// Tasks that ended strictly before this instant (queued and running tasks have not
        /// ended, so none of them matches).
        #[oai(name = "endedBefore")]
        ended_before: Query<Option<String>>,
        /// Only tasks of this type, by id or by its name in the project.
        #[oai(name = "typeId")]
        type_id: Query<Option<String>>,
        #[oai(name = "batchId")] batch_id: Query<Option<String>>,
    ) -> Result<Reply<PurgeOut>> {
        let project = self
            .0
            .project_for(auth.caller(), Right::ManageTasks, &id.0)?;
        let mut c = Check::default();
        let statuses = match status.0.as_deref() {
            Some(s) => validate::status_list(&mut c, s),
            None => crate::retention::FINAL.to_vec(),
        };
        let ended_before = ended_before
            .0
            .as_deref()
            .and_then(|t| c.time("endedBefore", t));
        let type_key = type_id.0.as_deref().map(|t| c.type_key("typeId", t));
        c.finish(())?;
        let type_id = match type_key {
            Some(key) => Some(self.0.type_id_in(project.id, &project.name, key)?),
            None => None,
        };
        let store = &self.0.store;
        let pid = project.id;
        let mut deleted = 0u64;
        // By the ENDED index: finished statuses with no other filter.
        let indexed = type_id.is_none() && batch_id.0.is_none();
        let mut rest = Vec::new();
        for status in statuses {
            if indexed && crate::retention::FINAL.contains(&status) {
                let cutoff = ended_before.map_or(i64::MAX, |t| t.saturating_sub(1));
                deleted += crate::retention::delete_all_ended(store, pid, status, cutoff).await?;
            } else {
                rest.push(status);
            }
        }
        if !rest.is_empty() {
            // Walk the listing by key, a page of 1,000 at a time, and delete what it found.
            let mut q = TaskQuery {
                statuses: rest,
                type_id,
                batch_id: batch_id.0,
                limit: crate::retention::CHUNK,
                ..TaskQuery::default()
            };
            loop {
                let (s, query) = (store.clone(), q.clone());
                let page = tokio::task::spawn_blocking(move || s.read()?.list_tasks(pid, &query))
                    .await
                    .map_err(|e| Error::Storage(e.to_string()))??;
                let ids: Vec<String> = page.tasks.iter().map(|t| t.id.clone()).collect();
                // What the page showed is checked again in the write: a task may have moved.
                let (before, want) = (ended_before, q.clone());
                let n = store
                    .write(move |w| {
                        write::delete_matching(w, pid, &ids, |t| {
                            want.statuses.contains(&t.status)
                                && want.type_id.is_none_or(|ty| t.type_id == Some(ty))
                                && want
                                    .batch_id
                                    .as_deref()
                                    .is_none_or(|b| t.batch_id.as_deref() == Some(b))
                                && before.is_none_or(|b| t.ended_at().is_some_and(|e| e < b))
                        })
                    })
                    .await?;
                deleted += n as u64;
                match page.next {
                    Some(cursor) => q.cursor = Some(cursor),
                    None => break,
                }
            }
        }
        Ok(Reply::ok(PurgeOut {
            deleted_tasks: deleted,
        }))
    }

    /// Cancel many tasks of a project: by id (up to 1,000) or by the listing's filters (the
    /// first 10,000 matches). Tasks not in the project or not cancellable are listed in
    /// `errors`; the others are cancelled.
    #[oai(
        path = "/api/projects/:projectId/tasks/cancel",
        method = "post",
        operation_id = "cancelTasks",
        tag = "ApiTags::Tasks"
    )]
    async fn cancel_many(
        &self,
        auth: Auth,
        #[oai(name = "projectId")] id: Path<String>,
        body: JsonBody<BulkCancelIn>,
    ) -> Result<Reply<BulkActionOut>> {
        let b = body.0;
        let reason = b.reason.map(String::from);
        if let Some(r) = &reason {
            let mut c = Check::default();
            c.max_len("reason", r, validate::MAX_REASON);
            c.finish(())?;
        }
        self.bulk_action(
            &auth,
            &id.0,
            b.ids,
            b.filter,
            write::BulkAction::Cancel,
            reason,
        )
        .await
    }

    /// Retry many failed or cancelled tasks of a project: by id (up to 1,000) or by the
    /// listing's filters (the first 10,000 matches).
    #[oai(
        path = "/api/projects/:projectId/tasks/retry",
        method = "post",
        operation_id = "retryTasks",
        tag = "ApiTags::Tasks"
    )]
    async fn retry_many(
        &self,
        auth: Auth,
        #[oai(name = "projectId")] id: Path<String>,
        body: JsonBody<BulkRetryIn>,
    ) -> Result<Reply<BulkActionOut>> {
        let b = body.0;
        self.bulk_action(
            &auth,
            &id.0,
            b.ids,
            b.filter,
            write::BulkAction::Retry,
            None,
        )
        .await
    }
}

/// The most tasks a filter of a bulk cancel or retry takes in one call.
const MAX_FILTERED: usize = 10_000;

impl TasksApi {
    /// A bulk cancel or retry: the tasks named or matched, changed in writes of up to 1,000.
    async fn bulk_action(
        &self,
        auth: &Auth,
        project_key: &str,
        ids: Option<Vec<Text>>,
        filter: Option<TaskFilterIn>,
        action: write::BulkAction,
        reason: Option<String>,
    ) -> Result<Reply<BulkActionOut>> {
        let project = self
            .0
            .project_for(auth.caller(), Right::ManageTasks, project_key)?;
        if let Some(ids) = &ids {
            let mut c = Check::default();
            if ids.is_empty() || ids.len() > validate::MAX_BULK {
                c.fail(
                    "ids",
                    format!("give 1 to {} task ids", validate::MAX_BULK),
                    ids.len(),
                );
            }
            c.finish(())?;
        }
        let (ids, more) = match (ids, filter) {
            (Some(ids), None) => (ids.into_iter().map(String::from).collect(), false),
            (None, Some(f)) => self.matching(&project, f).await?,
            (Some(ids), Some(f)) => {
                // The tasks named that the filter also matches.
                let (matches, more) = self.matching(&project, f).await?;
                let matches: std::collections::HashSet<String> = matches.into_iter().collect();
                let ids = ids
                    .into_iter()
                    .map(String::from)
                    .filter(|id| matches.contains(id))
                    .collect();
                (ids, more)
            }
            (None, None) => {
                return Err(Error::validation("ids", "give ids, a filter, or both").into())
            }
        };
        let matched = ids.len() as u64;
        let mut errors = Vec::new();
        for chunk in ids.chunks(validate::MAX_BULK) {
            let chunk = chunk.to_vec();
            let reason = reason.clone();
            let pid = project.id;
            let done = self
                .0
                .store
                .write(move |w| write::bulk_action(w, pid, &chunk, action, reason.as_deref()))
                .await?;
            errors.extend(
                done.into_iter()
                    .filter_map(|(id, why)| why.map(|error| BulkActionError { id, error })),
            );
        }
        Ok(Reply::ok(BulkActionOut {
            matched,
            changed: matched - errors.len() as u64,
            errors,
            more,
        }))
    }

    /// The ids of the first [`MAX_FILTERED`] tasks `f` matches, oldest first, and whether more
    /// match.
    async fn matching(
        &self,
        project: &crate::model::Project,
        f: TaskFilterIn,
    ) -> Result<(Vec<String>, bool)> {
        let mut c = Check::default();
        let statuses = f
            .status
            .as_deref()
            .map_or_else(Vec::new, |s| validate::status_list(&mut c, s));
        let type_key = f.type_id.as_deref().map(|t| c.type_key("filter.typeId", t));
        c.finish(())?;
        let type_id = match type_key {
            Some(key) => Some(self.0.type_id_in(project.id, &project.name, key)?),
            None => None,
        };
        let mut q = TaskQuery {
            statuses,
            type_id,
            assigned_to: f.assigned_to.map(String::from),
            batch_id: f.batch_id.map(String::from),
            limit: validate::MAX_LIMIT,
            ..TaskQuery::default()
        };
        let mut ids = Vec::new();
        loop {
            let store = self.0.store.clone();
            let (pid, query) = (project.id, q.clone());
            let page = tokio::task::spawn_blocking(move || store.read()?.list_tasks(pid, &query))
                .await
                .map_err(|e| Error::Storage(e.to_string()))??;
            for t in page.tasks {
                if ids.len() == MAX_FILTERED {
                    return Ok((ids, true));
                }
                ids.push(t.id);
            }
            match page.next {
                Some(next) => q.cursor = Some(next),
                None => return Ok((ids, false)),
            }
        }
    }
}
