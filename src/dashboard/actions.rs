//! The actions: POSTs, each allowed only to a signed-in operator and only
//! with the dashboard's CSRF token, each one library call (the CLI's), then
//! a redirect back to the page with what was done.

use axum::Form;
use axum::extract::{FromRequest, FromRequestParts, OriginalUri, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::pages::{base, urlencode};
use super::{Failure, SESSION_COOKIE, Shared, same};
use crate::queue::{LimitsUpdate, TaskMatch};
use crate::rate_limit::RateLimit;
use crate::task::{TaskId, TaskStatus};

/// Every form carries the CSRF token; the rest depends on the action.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ActionForm {
    csrf: Option<String>,
    rate: Option<String>,
    concurrency: Option<String>,
    weight: Option<String>,
    status: Option<String>,
    kind: Option<String>,
    error: Option<String>,
    token: Option<String>,
}

/// Refuses unless this dashboard allows actions, the request comes from a
/// signed-in operator, and it carries this dashboard's CSRF token.
fn allow(app: &Shared, headers: &HeaderMap, form: &ActionForm) -> Result<(), Failure> {
    if app.token.is_none() {
        return Err(Failure::Forbidden(
            "this dashboard is read-only: no admin token is configured (SYNCQ_DASHBOARD_TOKEN)"
                .into(),
        ));
    }
    if !app.is_admin(headers) {
        return Err(Failure::Forbidden(
            "sign in with the admin token first".into(),
        ));
    }
    let csrf_ok = form
        .csrf
        .as_deref()
        .is_some_and(|c| same(c.as_bytes(), app.csrf.as_bytes()));
    if !csrf_ok {
        return Err(Failure::Forbidden(
            "missing or wrong CSRF token: act from the dashboard's own pages".into(),
        ));
    }
    Ok(())
}

/// An action's request, once [`allow`]ed: where the dashboard is mounted
/// (for the redirect back) and the form. Every action handler takes one,
/// so none can forget the check.
pub(super) struct Allowed {
    root: String,
    form: ActionForm,
}

impl FromRequest<Shared> for Allowed {
    type Rejection = Response;

    async fn from_request(request: Request, app: &Shared) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = request.into_parts();
        let OriginalUri(original) = OriginalUri::from_request_parts(&mut parts, app)
            .await
            .map_err(IntoResponse::into_response)?;
        let root = base(&original, &parts.uri);
        let headers = parts.headers.clone();
        let Form(form) = Form::<ActionForm>::from_request(Request::from_parts(parts, body), app)
            .await
            .map_err(IntoResponse::into_response)?;
        allow(app, &headers, &form).map_err(IntoResponse::into_response)?;
        Ok(Allowed { root, form })
    }
}

impl Allowed {
    /// Back to `path` under the dashboard's root, saying what was done.
    fn back(&self, path: &str, done: &str) -> Response {
        back(&self.root, path, done)
    }
}

fn back(root: &str, path: &str, done: &str) -> Response {
    Redirect::to(&format!("{root}{path}?done={}", urlencode(done))).into_response()
}

fn text(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

pub(super) async fn login(
    State(app): State<Shared>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    Form(form): Form<ActionForm>,
) -> Result<Response, Failure> {
    let root = base(&original, &uri);
    let Some(token) = &app.token else {
        return Err(Failure::Forbidden("this dashboard is read-only".into()));
    };
    let csrf_ok = form
        .csrf
        .as_deref()
        .is_some_and(|c| same(c.as_bytes(), app.csrf.as_bytes()));
    let given = form.token.unwrap_or_default();
    if !csrf_ok || !same(given.as_bytes(), token.as_bytes()) {
        return Ok(Redirect::to(&format!("{root}/login?failed=1")).into_response());
    }
    let path = if root.is_empty() { "/" } else { root.as_str() };
    let cookie = format!("{SESSION_COOKIE}={given}; Path={path}; HttpOnly; SameSite=Strict");
    let mut response = back(&root, "/", "signed in");
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

pub(super) async fn logout(action: Allowed) -> Result<Response, Failure> {
    let root = &action.root;
    let path = if root.is_empty() { "/" } else { root.as_str() };
    let mut response = action.back("/", "signed out");
    let cookie = format!("{SESSION_COOKIE}=; Path={path}; Max-Age=0; HttpOnly; SameSite=Strict");
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

/// A dataset's page, for the redirect back.
fn dataset_page(id: &str) -> String {
    format!("/datasets/{}", urlencode(id))
}

pub(super) async fn pause(
    State(app): State<Shared>,
    Path(id): Path<String>,
    action: Allowed,
) -> Result<Response, Failure> {
    app.manager.queue(&id).pause().await?;
    Ok(action.back(&dataset_page(&id), "paused"))
}

pub(super) async fn resume(
    State(app): State<Shared>,
    Path(id): Path<String>,
    action: Allowed,
) -> Result<Response, Failure> {
    app.manager.queue(&id).resume().await?;
    Ok(action.back(&dataset_page(&id), "resumed"))
}

/// `none` clears; empty leaves alone; anything else is parsed.
fn setting<T>(
    field: &str,
    value: &Option<String>,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<Option<T>>, Failure> {
    match text(value).as_deref() {
        None => Ok(None),
        Some("none") => Ok(Some(None)),
        Some(v) => parse(v)
            .map(|t| Some(Some(t)))
            .ok_or_else(|| Failure::BadRequest(format!("{field}: cannot read {v:?}"))),
    }
}

pub(super) async fn limits(
    State(app): State<Shared>,
    Path(id): Path<String>,
    action: Allowed,
) -> Result<Response, Failure> {
    let form = &action.form;
    let rate = setting("rate", &form.rate, |v| v.parse::<RateLimit>().ok())?;
    let concurrency = setting("concurrency", &form.concurrency, |v| v.parse::<u32>().ok())?;
    let weight = match text(&form.weight) {
        None => None,
        Some(w) => Some(
            w.parse::<u32>()
                .map_err(|_| Failure::BadRequest(format!("weight: cannot read {w:?}")))?,
        ),
    };
    let update = LimitsUpdate {
        rate_limit: rate,
        max_concurrency: concurrency,
        weight,
    };
    app.manager.queue(&id).update_limits(update).await?;
    Ok(action.back(&dataset_page(&id), "limits changed"))
}

fn matching(form: &ActionForm) -> TaskMatch {
    TaskMatch {
        kind: text(&form.kind),
        error_contains: text(&form.error),
    }
}

pub(super) async fn retry_matching(
    State(app): State<Shared>,
    Path(id): Path<String>,
    action: Allowed,
) -> Result<Response, Failure> {
    let form = &action.form;
    let status = match text(&form.status).as_deref() {
        None | Some("failed") => TaskStatus::Failed,
        Some("cancelled") => TaskStatus::Cancelled,
        Some(other) => {
            return Err(Failure::BadRequest(format!(
                "status: only failed or cancelled tasks can be retried, not {other:?}"
            )));
        }
    };
    let n = app
        .manager
        .queue(&id)
        .retry_matching(status, &matching(form))
        .await?;
    Ok(action.back(
        &dataset_page(&id),
        &format!("{n} {status} task(s) queued again"),
    ))
}

pub(super) async fn cancel_matching(
    State(app): State<Shared>,
    Path(id): Path<String>,
    action: Allowed,
) -> Result<Response, Failure> {
    let form = &action.form;
    let n = app
        .manager
        .queue(&id)
        .cancel_matching(&matching(form))
        .await?;
    Ok(action.back(
        &dataset_page(&id),
        &format!("cancel requested for {n} task(s)"),
    ))
}

fn task_id(id: &str) -> Result<TaskId, Failure> {
    id.parse()
        .map_err(|_| Failure::NotFound(format!("no task {id:?}")))
}

pub(super) async fn cancel_task(
    State(app): State<Shared>,
    Path(id): Path<String>,
    action: Allowed,
) -> Result<Response, Failure> {
    let id = task_id(&id)?;
    let done = match app.manager.cancel(id).await? {
        Some(TaskStatus::Cancelled) => "cancelled",
        Some(_) => "cancel requested: its handler was told",
        None => "nothing to cancel: the task is not queued or running",
    };
    Ok(action.back(&format!("/tasks/{id}"), done))
}

pub(super) async fn retry_task(
    State(app): State<Shared>,
    Path(id): Path<String>,
    action: Allowed,
) -> Result<Response, Failure> {
    let id = task_id(&id)?;
    let done = if app.manager.retry(id).await? {
        "queued again"
    } else {
        "nothing to retry: only failed or cancelled tasks can be retried"
    };
    Ok(action.back(&format!("/tasks/{id}"), done))
}
