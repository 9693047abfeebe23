//! Projects and task types.

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
use crate::store::write;

pub struct ProjectsApi(pub Arc<State>);

#[OpenApi]
impl ProjectsApi {
    /// List projects.
    #[oai(
        path = "/api/projects",
        method = "get",
        operation_id = "listProjects",
        tag = "ApiTags::Projects"
    )]
    async fn list(
        &self,
        auth: Auth,
        /// `active` (default), `closed` or `all`.
        status: Query<Option<ProjectFilter>>,
        limit: Query<Option<i64>>,
        offset: Query<Option<i64>>,
    ) -> Result<ListReply<ProjectOut>> {
        let mut c = Check::default();
        let status = status.0.unwrap_or_default().status();
        let (limit, offset) = validate::paging(&mut c, limit.0, offset.0);
        c.finish(())?;
        let caller = auth.caller();
        caller.require(Right::Read)?;
        let (rows, total) =
            self.0
                .store
                .read()?
                .projects(status, &|id| caller.sees(id), limit, offset)?;
        let data = rows
            .into_iter()
            .map(|(p, s)| ProjectOut::new(p, s))
            .collect();
        Ok(ListReply::new(data, total, limit, offset, None))
    }

    /// Create a project.
    #[oai(
        path = "/api/projects",
        method = "post",
        operation_id = "createProject",
        tag = "ApiTags::Projects"
    )]
    async fn create(
        &self,
        auth: Auth,
        body: JsonBody<CreateProject>,
    ) -> Result<CreatedReply<ProjectOut>> {
        let caller = auth.caller();
        caller.require(Right::ManageProjects)?;
        if caller.scoped() {
            return Err(Error::Forbidden(
                "a key limited to projects cannot create projects".into(),
            )
            .into());
        }
        let input = validate::create_project(body.0)?;
        let (p, s) = self
            .0
            .store
            .write(move |w| write::create_project(w, input))
            .await?;
        Ok(CreatedReply::created(ProjectOut::new(p, s)))
    }

    /// Get a project by id or name.
    #[oai(
        path = "/api/projects/:projectId",
        method = "get",
        operation_id = "getProject",
        tag = "ApiTags::Projects"
    )]
    async fn get(
        &self,
        auth: Auth,
        #[oai(name = "projectId")] id: Path<String>,
    ) -> Result<Reply<ProjectOut>> {
        let p = self.0.project_for(auth.caller(), Right::Read, &id.0)?;
        let s = self.0.store.read()?.stats(p.id)?;
        Ok(Reply::ok(ProjectOut::new(p, s)))
    }

    /// Update a project (closing it stops new tasks and hand-outs).
    #[oai(
        path = "/api/projects/:projectId",
        method = "put",
        operation_id = "updateProject",
        tag = "ApiTags::Projects"
    )]
    async fn update(
        &self,
        auth: Auth,
        #[oai(name = "projectId")] id: Path<String>,
        body: JsonBody<UpdateProject>,
    ) -> Result<Reply<ProjectOut>> {
        self.0
            .project_for(auth.caller(), Right::ManageProjects, &id.0)?;
        let patch = validate::update_project(body.0)?;
        let (p, s) = self
            .0
            .store
            .write(move |w| write::update_project(w, &id.0, patch))
            .await?;
        Ok(Reply::ok(ProjectOut::new(p, s)))
    }

    /// Delete a project with its task types, tasks and leases.
    ///
    /// The project disappears at once (404 everywhere, its name free); the answer comes when
    /// everything is gone. A delete cut short can be taken up by deleting the project again,
    /// by its id.
    #[oai(
        path = "/api/projects/:projectId",
        method = "delete",
        operation_id = "deleteProject",
        tag = "ApiTags::Projects"
    )]
    async fn delete(
        &self,
        auth: Auth,
        #[oai(name = "projectId")] id: Path<String>,
    ) -> Result<Reply<Deleted>> {
        let caller = auth.caller();
        let project = match self.0.project_for(caller, Right::ManageProjects, &id.0) {
            Ok(p) => p.id,
            // A project whose delete is running, or was cut short (a storage error), is
            // hidden; deleting it again takes the delete up and answers when it is done.
            Err(hidden) => match self.0.store.read()?.project_being_deleted(&id.0)? {
                Some(pid) => {
                    caller.require_in(Right::ManageProjects, pid, &format!("project {}", id.0))?;
                    pid
                }
                None => return Err(hidden.into()),
            },
        };
        self.0.store.delete_project(project).await?;
        Ok(Reply::ok(Deleted {
            deleted: true,
            id: uuid_str(project),
        }))
    }

    /// Exact counters, queue depth, active agents and the last hour's activity.
    #[oai(
        path = "/api/projects/:projectId/stats",
        method = "get",
        operation_id = "getProjectStats",
        tag = "ApiTags::Projects"
    )]
    async fn stats(
        &self,
        auth: Auth,
        #[oai(name = "projectId")] id: Path<String>,
    ) -> Result<Reply<ProjectStatsOut>> {
        let p = self.0.project_for(auth.caller(), Right::Read, &id.0)?;
        let r = self.0.store.read()?;
        Ok(Reply::ok(stats_of(&r, p, self.0.store.clock.now())?))
    }

    /// Every visible project's stats in one answer, as `getProjectStats` gives them: the
    /// dashboard's overview polls this. Counters and a few small rows per project, no scan.
    #[oai(
        path = "/api/stats",
        method = "get",
        operation_id = "listProjectStats",
        tag = "ApiTags::Projects"
    )]
    async fn all_stats(
        &self,
        auth: Auth,
        /// `active` (default), `closed` or `all`.
        status: Query<Option<ProjectFilter>>,
        limit: Query<Option<i64>>,
        offset: Query<Option<i64>>,
    ) -> Result<ListReply<ProjectStatsOut>> {
        let mut c = Check::default();
        let (limit, offset) = validate::paging(&mut c, limit.0, offset.0);
        c.finish(())?;
        let caller = auth.caller();
        caller.require(Right::Read)?;
        let r = self.0.store.read()?;
        let now = self.0.store.clock.now();
        let (rows, total) = r.projects(
            status.0.unwrap_or_default().status(),
            &|id| caller.sees(id),
            limit,
            offset,
        )?;
        let data = rows
            .into_iter()
            .map(|(p, _)| stats_of(&r, p, now))
            .collect::<crate::error::Result<Vec<_>>>()?;
        Ok(ListReply::new(data, total, limit, offset, None))
    }

    /// List a project's task types.
    #[oai(
        path = "/api/projects/:projectId/task-types",
        method = "get",
        operation_id = "listTaskTypes",
        tag = "ApiTags::TaskTypes"
    )]
    async fn list_types(
        &self,
        auth: Auth,
        #[oai(name = "projectId")] id: Path<String>,
        limit: Query<Option<i64>>,
        offset: Query<Option<i64>>,
    ) -> Result<ListReply<TaskTypeOut>> {
        let (limit, offset) = validate::page(limit.0, offset.0)?;
        let p = self.0.project_for(auth.caller(), Right::Read, &id.0)?;
        let r = self.0.store.read()?;
        let types: Vec<TaskTypeOut> = r.task_types(p.id)?.into_iter().map(Into::into).collect();
        Ok(ListReply::page(types, limit, offset))
    }

    /// Create a task type.
    #[oai(
        path = "/api/projects/:projectId/task-types",
        method = "post",
        operation_id = "createTaskType",
        tag = "ApiTags::TaskTypes"
    )]
    async fn create_type(
        &self,
        auth: Auth,
        #[oai(name = "projectId")] id: Path<String>,
        body: JsonBody<CreateTaskType>,
    ) -> Result<CreatedReply<TaskTypeOut>> {
        self.0
            .project_for(auth.caller(), Right::ManageProjects, &id.0)?;
        if body.0.script.is_some() {
            auth.caller().require_scripts()?;
        }
        let input = validate::create_type(body.0)?;
        let t = self
            .0
            .store
            .write(move |w| write::create_type(w, &id.0, input))
            .await?;
        Ok(CreatedReply::created(t.into()))
    }

    /// Get a task type.
    #[oai(
        path = "/api/task-types/:typeId",
        method = "get",
        operation_id = "getTaskType",
        tag = "ApiTags::TaskTypes"
    )]
    async fn get_type(
        &self,
        auth: Auth,
        #[oai(name = "typeId")] id: Path<String>,
    ) -> Result<Reply<TaskTypeOut>> {
        self.0.check_type(auth.caller(), Right::Read, &id.0)?;
        Ok(Reply::ok(self.0.store.read()?.task_type(&id.0)?.into()))
    }

    /// Update a task type. Existing tasks keep their rendered instructions.
    #[oai(
        path = "/api/task-types/:typeId",
        method = "put",
        operation_id = "updateTaskType",
        tag = "ApiTags::TaskTypes"
    )]
    async fn update_type(
        &self,
        auth: Auth,
        #[oai(name = "typeId")] id: Path<String>,
        body: JsonBody<UpdateTaskType>,
    ) -> Result<Reply<TaskTypeOut>> {
        self.0
            .check_type(auth.caller(), Right::ManageProjects, &id.0)?;
        if body.0.script.is_value() {
            auth.caller().require_scripts()?;
        }
        let patch = validate::update_type(body.0)?;
        let t = self
            .0
            .store
            .write(move |w| write::update_type(w, &id.0, patch))
            .await?;
        Ok(Reply::ok(t.into()))
    }

    /// Delete a task type. Its tasks stay and fall back to the project's defaults.
    #[oai(
        path = "/api/task-types/:typeId",
        method = "delete",
        operation_id = "deleteTaskType",
        tag = "ApiTags::TaskTypes"
    )]
    async fn delete_type(
        &self,
        auth: Auth,
        #[oai(name = "typeId")] id: Path<String>,
    ) -> Result<Reply<Deleted>> {
        self.0
            .check_type(auth.caller(), Right::ManageProjects, &id.0)?;
        let key = id.0.clone();
        self.0
            .store
            .write(move |w| write::delete_type(w, &key))
            .await?;
        Ok(Reply::ok(Deleted {
            deleted: true,
            id: id.0,
        }))
    }
}

/// A project's stats answer: its counters, the last hour by minute and its oldest queued task.
fn stats_of(
    r: &crate::store::read::Reader,
    p: crate::model::Project,
    now: crate::model::Millis,
) -> crate::error::Result<ProjectStatsOut> {
    let s = r.stats(p.id)?;
    let minutes = r.activity_by_minute(p.id, now)?;
    let oldest = r.oldest_queued(p.id)?;
    Ok(ProjectStatsOut {
        status: p.status.as_str().to_string(),
        project: ProjectRef {
            id: uuid_str(p.id),
            name: p.name,
            stats: s.into(),
        },
        queue_depth: s.queued,
        // An agent holds at most one lease per project (next-task resumes the one it holds),
        // and every running task is held: so the running count, kept exact.
        active_agents: s.running,
        recent_activity: RecentActivityOut::new(minutes),
        oldest_queued_at: oldest.map(crate::time::format),
        oldest_queued_age_seconds: oldest.map(|t| (now - t).max(0) as f64 / 1000.0),
    })
}
