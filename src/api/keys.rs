//! Keys, sessions and the credentials of a request, over HTTP.
//!
//! Authentication itself happens once per request in `api::frame`, which puts the
//! [`Caller`] in the request; [`Auth`] hands it to operations and documents the two ways to
//! send a credential in the OpenAPI document.

use std::sync::Arc;

use super::body::JsonBody;
use poem::Request;
use poem_openapi::auth::{ApiKey, Bearer};
use poem_openapi::param::{Path, Query};
use poem_openapi::types::MaybeUndefined;
use poem_openapi::{Object, OpenApi, SecurityScheme};
use uuid::Uuid;

use super::error::ApiResult;
use super::types::*;
use super::validate::{self, Check};
use super::{ApiTags, State};
use crate::auth::{self, Caller, Right};
use crate::error::Error;
use crate::model::{ApiKey as Key, Role};
use crate::spawn::to_the_end;
use crate::store::keys;

async fn caller_of(req: &Request) -> Option<Arc<Caller>> {
    req.extensions().get::<Arc<Caller>>().cloned()
}

async fn from_key(req: &Request, _: ApiKey) -> Option<Arc<Caller>> {
    caller_of(req).await
}

async fn from_bearer(req: &Request, _: Bearer) -> Option<Arc<Caller>> {
    caller_of(req).await
}

/// An API key in the `X-API-Key` header.
#[derive(SecurityScheme)]
#[oai(
    rename = "ApiKey",
    ty = "api_key",
    key_name = "X-API-Key",
    key_in = "header",
    checker = "from_key"
)]
pub struct KeyAuth(Arc<Caller>);

/// An API key or a session token as `Authorization: Bearer <credential>`.
#[derive(SecurityScheme)]
#[oai(rename = "Bearer", ty = "bearer", checker = "from_bearer")]
pub struct BearerAuth(Arc<Caller>);

/// The credentials of a request.
#[derive(SecurityScheme)]
pub enum Auth {
    Key(KeyAuth),
    Bearer(BearerAuth),
}

impl Auth {
    /// The caller, to move into a write.
    pub fn caller_arc(&self) -> Arc<Caller> {
        match self {
            Auth::Key(k) => k.0.clone(),
            Auth::Bearer(b) => b.0.clone(),
        }
    }

    pub fn caller(&self) -> &Caller {
        match self {
            Auth::Key(k) => &k.0,
            Auth::Bearer(b) => &b.0,
        }
    }
}

#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateKeyIn {
    pub name: Text,
    /// `admin`, `producer`, `agent` or `viewer`.
    pub role: Text,
    /// Project ids or names the key is limited to; null or absent = all projects.
    pub projects: Option<Vec<Text>>,
    /// Whether the key may create tasks and task types that carry a `script` (admin keys
    /// always may). Default false.
    pub allow_scripts: Option<bool>,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct KeyOut {
    pub id: String,
    pub name: String,
    pub role: String,
    pub projects: Option<Vec<String>>,
    pub allow_scripts: bool,
    pub created_at: String,
    pub last_used_at: Option<String>,
    /// The key itself: shown once, in the answer that created it.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl KeyOut {
    fn new(k: Key, text: Option<String>) -> Self {
        KeyOut {
            id: uuid_str(k.id),
            name: k.name,
            role: k.role.as_str().to_string(),
            projects: k.projects.map(|p| p.into_iter().map(uuid_str).collect()),
            allow_scripts: k.allow_scripts,
            created_at: crate::time::format(k.created_at),
            last_used_at: k.last_used_at.map(crate::time::format),
            key: text,
        }
    }
}

#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoginIn {
    /// With `projectId`: the agent the session acts as. Leave both out for a key-scoped
    /// session (the dashboard's), whose rights are exactly the key's.
    pub agent_name: MaybeUndefined<Text>,
    /// With `agentName`: the one project the session may reach.
    pub project_id: MaybeUndefined<Text>,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct LoginOut {
    pub session_id: String,
    pub token: String,
    pub expires_at: String,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct SessionOut {
    pub session_id: String,
    /// The agent and project of a bound session; absent for a key-scoped one.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_name: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    /// The role of the session's key: what the session may do.
    pub role: String,
    /// The projects the session reaches; null = every project.
    pub projects: Option<Vec<String>>,
    /// Whether the session may give tasks and task types a script.
    pub allow_scripts: bool,
    pub created_at: String,
    pub expires_at: String,
    pub last_activity: String,
}

#[derive(Object)]
#[oai(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtendSessionIn {
    /// Seconds to add to the session's expiry (1 to 30 days).
    pub extend_by: i64,
}

#[derive(Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct LoggedOut {
    pub logged_out: bool,
}

pub struct KeysApi(pub Arc<State>);

fn no_session() -> Error {
    Error::NotFound("this request carries no session: log in first".into())
}

fn key_admin(c: &Caller) -> Result<(), Error> {
    c.require(Right::Admin)?;
    if c.scoped() {
        return Err(Error::Forbidden(
            "keys are managed with an admin key that is not limited to projects".into(),
        ));
    }
    Ok(())
}

#[OpenApi]
impl KeysApi {
    /// Create an API key (admin). The key is in the answer, once; only its hash is stored.
    #[oai(
        path = "/api/keys",
        method = "post",
        operation_id = "createKey",
        tag = "ApiTags::Access"
    )]
    async fn create_key(
        &self,
        auth: Auth,
        body: JsonBody<CreateKeyIn>,
    ) -> ApiResult<CreatedReply<KeyOut>> {
        key_admin(auth.caller())?;
        let b = body.0;
        let mut c = Check::default();
        c.name("name", &b.name, validate::MAX_NAME, "Key name");
        let role = Role::parse(&b.role);
        if role.is_none() {
            c.fail("role", "must be admin, producer, agent or viewer", &*b.role);
        }
        if let Some(p) = &b.projects {
            if p.is_empty() {
                c.fail("projects", "give at least one project, or null for all", 0);
            }
        }
        c.finish(())?;
        let id = Uuid::now_v7().as_u128();
        let text = auth::new_key_text(id);
        let hash = self.0.auth.hash(text.clone()).await?;
        let new = keys::NewKey {
            id,
            name: b.name.0,
            role: role.expect("checked"),
            projects: b
                .projects
                .map(|p| p.into_iter().map(String::from).collect()),
            hash,
            allow_scripts: b.allow_scripts.unwrap_or(false),
        };
        let key = self
            .0
            .store
            .write(move |w| keys::create_key(w, new))
            .await?;
        Ok(CreatedReply::created(KeyOut::new(key, Some(text))))
    }

    /// List API keys (admin). Never shows a key or its hash.
    #[oai(
        path = "/api/keys",
        method = "get",
        operation_id = "listKeys",
        tag = "ApiTags::Access"
    )]
    async fn list_keys(
        &self,
        auth: Auth,
        limit: Query<Option<i64>>,
        offset: Query<Option<i64>>,
    ) -> ApiResult<ListReply<KeyOut>> {
        let (limit, offset) = validate::page(limit.0, offset.0)?;
        key_admin(auth.caller())?;
        let keys: Vec<KeyOut> = self
            .0
            .store
            .keys()?
            .into_iter()
            .map(|k| KeyOut::new(k, None))
            .collect();
        Ok(ListReply::page(keys, limit, offset))
    }

    /// Revoke an API key (admin): it and its sessions stop working at once.
    #[oai(
        path = "/api/keys/:keyId",
        method = "delete",
        operation_id = "deleteKey",
        tag = "ApiTags::Access"
    )]
    async fn delete_key(
        &self,
        auth: Auth,
        #[oai(name = "keyId")] id: Path<String>,
    ) -> ApiResult<Reply<Deleted>> {
        key_admin(auth.caller())?;
        let kid = Uuid::parse_str(&id.0)
            .map_err(|_| Error::NotFound(format!("key {} not found", id.0)))?
            .as_u128();
        // To the end, so that a client that gives up between the commit and the forget cannot
        // leave the revoked key (or its sessions) in the cache.
        let state = self.0.clone();
        to_the_end(async move {
            state.store.write(move |w| keys::delete_key(w, kid)).await?;
            state.auth.forget_key(kid);
            Ok(())
        })
        .await?;
        Ok(Reply::ok(Deleted {
            deleted: true,
            id: uuid_str(kid),
        }))
    }

    /// A consistent copy of the whole database as of one read transaction, streamed while
    /// the server keeps serving writes (admin key not limited to projects: the copy holds
    /// every project and every key's hash). The copy is a normal database: stop the server,
    /// replace the file with it, start again.
    #[oai(
        path = "/api/admin/backup",
        method = "get",
        operation_id = "backupDatabase",
        tag = "ApiTags::Access"
    )]
    async fn backup(&self, auth: Auth) -> ApiResult<BackupReply> {
        key_admin(auth.caller())?;
        let store = self.0.store.clone();
        let now = store.clock.now();
        let (file, bytes) = tokio::task::spawn_blocking(move || -> Result<_, Error> {
            let db = store.path();
            let name = db
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("agentq.redb");
            // Beside the database: the same filesystem, which the operator sized for it.
            let tmp = db.with_file_name(format!(".{name}.backup-{}", Uuid::new_v4()));
            let copied = store
                .read()
                .and_then(|r| crate::store::check::copy_snapshot(r.transaction(), &tmp));
            let opened = copied
                .and_then(|_| std::fs::File::open(&tmp).map_err(|e| Error::Storage(e.to_string())));
            // Unlinked once open: the copy's space returns when the answer ends, even if the
            // client leaves or the process dies.
            let _ = std::fs::remove_file(&tmp);
            let f = opened?;
            let bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
            Ok((f, bytes))
        })
        .await
        .map_err(|e| Error::Storage(e.to_string()))??;
        let body = poem::Body::from_async_read(tokio::fs::File::from_std(file));
        let stamp = crate::time::format(now).replace(':', "-");
        Ok(BackupReply::Ok(
            poem_openapi::payload::Binary(body),
            format!("attachment; filename=\"agentq-backup-{stamp}.redb\""),
            bytes,
        ))
    }

    /// Start a session for one agent in one project, with the key's rights.
    ///
    /// A key holds at most `--max-sessions-per-key` live sessions (default 1,000); a login
    /// past that answers 409 until one of them ends (logout, expiry, or the key's
    /// revocation).
    #[oai(
        path = "/api/auth/login",
        method = "post",
        operation_id = "login",
        tag = "ApiTags::Access"
    )]
    async fn login(&self, auth: Auth, body: JsonBody<LoginIn>) -> ApiResult<Reply<LoginOut>> {
        let c = auth.caller();
        if c.session.is_some() {
            return Err(Error::Forbidden("log in with an API key, not a session".into()).into());
        }
        let (agent_name, project_id) = (body.0.agent_name, body.0.project_id);
        for (field, null) in [
            ("agentName", agent_name.is_null()),
            ("projectId", project_id.is_null()),
        ] {
            if null {
                return Err(Error::validation(field, "must be a string, not null").into());
            }
        }
        let scope = match (agent_name.take(), project_id.take()) {
            (Some(agent), Some(project)) => {
                validate::agent_name(&agent)?;
                let p = self.0.store.read()?.project(&project)?;
                c.require_in(Right::Read, p.id, &format!("project {}", &*project))?;
                Some((agent.0, uuid_str(p.id)))
            }
            (None, None) => None,
            (agent, _) => {
                let (given, missing) = match agent {
                    Some(_) => ("agentName", "projectId"),
                    None => ("projectId", "agentName"),
                };
                return Err(Error::validation(
                    missing,
                    format!(
                        "{given} needs {missing}: give both for an agent's session, or \
                         neither for a key-scoped one"
                    ),
                )
                .into());
            }
        };
        let token = auth::new_session_token();
        let hash = auth::digest(&token);
        let (key_id, limits) = (c.key_id, self.0.auth.sessions);
        let s = self
            .0
            .store
            .write(move |w| keys::create_session(w, key_id, scope, limits, hash))
            .await?;
        Ok(Reply::ok(LoginOut {
            session_id: uuid_str(s.id),
            token,
            expires_at: crate::time::format(s.expires_at),
        }))
    }

    /// End the session of this request.
    #[oai(
        path = "/api/auth/logout",
        method = "post",
        operation_id = "logout",
        tag = "ApiTags::Access"
    )]
    async fn logout(&self, auth: Auth) -> ApiResult<Reply<LoggedOut>> {
        let s = auth.caller().session.clone().ok_or_else(no_session)?;
        let (hash, state) = (s.token_hash, self.0.clone());
        // As for a revoked key: the forget must follow the commit even if the client leaves.
        let done = to_the_end(async move {
            let done = state
                .store
                .write(move |w| keys::end_session(w, hash))
                .await?;
            state.auth.forget_session(&hash);
            Ok(done)
        })
        .await?;
        Ok(Reply::ok(LoggedOut { logged_out: done }))
    }

    /// The session of this request.
    #[oai(
        path = "/api/auth/session",
        method = "get",
        operation_id = "getSession",
        tag = "ApiTags::Access"
    )]
    async fn session(&self, auth: Auth) -> ApiResult<Reply<SessionOut>> {
        let b = auth.caller().session.clone().ok_or_else(no_session)?;
        let s = self
            .0
            .store
            .session(&b.token_hash)?
            .ok_or_else(no_session)?;
        Ok(Reply::ok(session_out(auth.caller(), s)))
    }

    /// Extend the session of this request by `extendBy` seconds.
    #[oai(
        path = "/api/auth/session",
        method = "put",
        operation_id = "extendSession",
        tag = "ApiTags::Access"
    )]
    async fn extend_session(
        &self,
        auth: Auth,
        body: JsonBody<ExtendSessionIn>,
    ) -> ApiResult<Reply<SessionOut>> {
        let b = auth.caller().session.clone().ok_or_else(no_session)?;
        let mut c = Check::default();
        let secs = c.int_range(
            "extendBy",
            body.0.extend_by,
            &validate::SESSION_EXTEND_SECONDS,
        );
        c.finish(())?;
        let s = self
            .0
            .store
            .write(move |w| keys::extend_session(w, b.token_hash, secs as i64 * 1000))
            .await?;
        Ok(Reply::ok(session_out(auth.caller(), s)))
    }
}

fn session_out(c: &auth::Caller, s: crate::model::Session) -> SessionOut {
    let scope = s.scope().map(|(a, p)| (a.to_string(), p));
    SessionOut {
        session_id: uuid_str(s.id),
        agent_name: scope.as_ref().map(|(a, _)| a.clone()),
        project_id: scope.map(|(_, p)| uuid_str(p)),
        role: c.role.as_str().to_string(),
        projects: c
            .projects
            .as_ref()
            .map(|p| p.iter().copied().map(uuid_str).collect()),
        allow_scripts: c.allow_scripts,
        created_at: crate::time::format(s.created_at),
        expires_at: crate::time::format(s.expires_at),
        last_activity: crate::time::format(s.last_activity),
    }
}
