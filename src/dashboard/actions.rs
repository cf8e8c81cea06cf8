//! The actions: POSTs, each allowed only to a signed-in operator and only
//! with the dashboard's CSRF token, each one library call (the CLI's), then
//! a redirect back to the page with what was done.

use axum::Form;
use axum::extract::{OriginalUri, Path, State};
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

pub(super) async fn logout(
    State(app): State<Shared>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Result<Response, Failure> {
    allow(&app, &headers, &form)?;
    let root = base(&original, &uri);
    let path = if root.is_empty() { "/" } else { root.as_str() };
    let mut response = back(&root, "/", "signed out");
    let cookie = format!("{SESSION_COOKIE}=; Path={path}; Max-Age=0; HttpOnly; SameSite=Strict");
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

/// The dataset's root and its page, for the redirect back.
fn dataset_page(original: &Uri, uri: &Uri, id: &str) -> (String, String) {
    (base(original, uri), format!("/datasets/{}", urlencode(id)))
}

pub(super) async fn pause(
    State(app): State<Shared>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Result<Response, Failure> {
    allow(&app, &headers, &form)?;
    app.manager.queue(&id).pause().await?;
    let (root, page) = dataset_page(&original, &uri, &id);
    Ok(back(&root, &page, "paused"))
}

pub(super) async fn resume(
    State(app): State<Shared>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Result<Response, Failure> {
    allow(&app, &headers, &form)?;
    app.manager.queue(&id).resume().await?;
    let (root, page) = dataset_page(&original, &uri, &id);
    Ok(back(&root, &page, "resumed"))
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
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Result<Response, Failure> {
    allow(&app, &headers, &form)?;
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
    let (root, page) = dataset_page(&original, &uri, &id);
    Ok(back(&root, &page, "limits changed"))
}

fn matching(form: &ActionForm) -> TaskMatch {
    TaskMatch {
        kind: text(&form.kind),
        error_contains: text(&form.error),
    }
}

pub(super) async fn retry_matching(
    State(app): State<Shared>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Result<Response, Failure> {
    allow(&app, &headers, &form)?;
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
        .retry_matching(status, &matching(&form))
        .await?;
    let (root, page) = dataset_page(&original, &uri, &id);
    Ok(back(
        &root,
        &page,
        &format!("{n} {status} task(s) queued again"),
    ))
}

pub(super) async fn cancel_matching(
    State(app): State<Shared>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Result<Response, Failure> {
    allow(&app, &headers, &form)?;
    let n = app
        .manager
        .queue(&id)
        .cancel_matching(&matching(&form))
        .await?;
    let (root, page) = dataset_page(&original, &uri, &id);
    Ok(back(
        &root,
        &page,
        &format!("cancel requested for {n} task(s)"),
    ))
}

fn task_id(id: &str) -> Result<TaskId, Failure> {
    id.parse()
        .map_err(|_| Failure::NotFound(format!("no task {id:?}")))
}

pub(super) async fn cancel_task(
    State(app): State<Shared>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Result<Response, Failure> {
    allow(&app, &headers, &form)?;
    let id = task_id(&id)?;
    let done = match app.manager.cancel(id).await? {
        Some(TaskStatus::Cancelled) => "cancelled",
        Some(_) => "cancel requested: its handler was told",
        None => "nothing to cancel: the task is not queued or running",
    };
    Ok(back(&base(&original, &uri), &format!("/tasks/{id}"), done))
}

pub(super) async fn retry_task(
    State(app): State<Shared>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Result<Response, Failure> {
    allow(&app, &headers, &form)?;
    let id = task_id(&id)?;
    let done = if app.manager.retry(id).await? {
        "queued again"
    } else {
        "nothing to retry: only failed or cancelled tasks can be retried"
    };
    Ok(back(&base(&original, &uri), &format!("/tasks/{id}"), done))
}
