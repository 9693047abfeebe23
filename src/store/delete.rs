//! Deleting a project in chunks, so that a project of a million tasks does not hold the
//! writer; a delete cut short is finished at the next start.

use super::*;
use crate::spawn::to_the_end;

impl Store {
    pub async fn delete_project(self: &Arc<Self>, project: u128) -> Result<()> {
        let store = self.clone();
        let delete = async move {
            store
                .write(move |w| write::begin_project_delete(w, project))
                .await?;
            store.hub.wake_all(project);
            store.finish_delete(project).await
        };
        to_the_end(delete).await
    }

    /// The chunks and the last write of a project delete (see [`Store::delete_project`]).
    /// Logs the project and how many tasks went, and how long it took.
    async fn finish_delete(&self, project: u128) -> Result<()> {
        let started = std::time::Instant::now();
        let mut tasks = 0;
        loop {
            let n = self
                .write(move |w| write::delete_project_tasks(w, project, write::DELETE_CHUNK))
                .await?;
            tasks += n;
            if n < write::DELETE_CHUNK {
                break;
            }
        }
        tasks += self
            .write(move |w| write::finish_project_delete(w, project))
            .await?;
        tracing::info!(
            project = %uuid::Uuid::from_u128(project),
            tasks,
            ms = started.elapsed().as_millis() as u64,
            "project deleted"
        );
        Ok(())
    }

    /// Ends the project deletes a crash or a stop cut short: the projects still marked
    /// [`ProjectStatus::Deleting`](crate::model::ProjectStatus::Deleting). The server runs it
    /// in the background at start-up; answers how many it finished.
    pub async fn resume_deletes(&self) -> Result<usize> {
        let pending = self.read()?.projects_being_deleted()?;
        for &project in &pending {
            tracing::info!(
                project = %uuid::Uuid::from_u128(project),
                "resuming a project delete cut short"
            );
            self.finish_delete(project).await?;
        }
        Ok(pending.len())
    }
}
