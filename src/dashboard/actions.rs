//! The actions: POSTs, each allowed only to a signed-in operator and only
//! with the dashboard's CSRF token, each one library call (the CLI's), then
//! a redirect back to the page with what was done.

use axum::Form;
use axum::extract::{FromRequest, FromRequestParts, OriginalUri, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::pages::{Done, base, urlencode};
use super::session::{Caller, LOGIN_COOKIE, SESSION_COOKIE, SESSION_LIFETIME};
use super::{Failure, Shared};
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
    uses: Option<String>,
    adaptive: Option<String>,
}

/// Refuses unless this dashboard allows actions, the request comes from a
/// signed-in operator, and a session's request carries its CSRF token.
fn allow(app: &Shared, headers: &HeaderMap, form: &ActionForm) -> Result<Caller, Failure> {
    if app.sessions.is_read_only() {
        return Err(Failure::Forbidden(
            "this dashboard is read-only: no admin token is configured (SYNCQ_DASHBOARD_TOKEN)"
                .into(),
        ));
    }
    let caller = app.caller(headers);
    if !caller.is_admin() {
        return Err(Failure::Forbidden(
            "sign in with the admin token first".into(),
        ));
    }
    if !app.sessions.csrf_ok(&caller, form.csrf.as_deref()) {
        return Err(Failure::Forbidden(
            "missing or wrong CSRF token: act from the dashboard's own pages".into(),
        ));
    }
    Ok(caller)
}

/// An action's request, once [`allow`]ed: where the dashboard is mounted
/// (for the redirect back) and the form. Every action handler takes one,
/// so none can forget the check.
pub(super) struct Allowed {
    root: String,
    form: ActionForm,
    caller: Caller,
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
        let caller = allow(app, &headers, &form).map_err(IntoResponse::into_response)?;
        Ok(Allowed { root, form, caller })
    }
}

impl Allowed {
    /// Back to `path` under the dashboard's root, saying what was done.
    fn back(&self, path: &str, done: Done) -> Response {
        back(&self.root, path, done)
    }
}

/// A redirect to `path`, its flash message named by code (the page prints
/// a fixed text for it: nothing a link's author can write).
fn back(root: &str, path: &str, done: Done) -> Response {
    let query = match done.count() {
        Some(n) => format!("done={}&n={n}", done.code()),
        None => format!("done={}", done.code()),
    };
    Redirect::to(&format!("{root}{path}?{query}")).into_response()
}

/// Refuses an action on a dataset that does not exist: like the CLI
/// without `--create`, the dashboard configures only datasets it lists.
async fn known_dataset(app: &Shared, id: &str) -> Result<(), Failure> {
    if app.manager.dataset_exists(id).await? {
        Ok(())
    } else {
        Err(Failure::NotFound(format!("no dataset {id:?}")))
    }
}

fn text(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn cookie_path(root: &str) -> &str {
    if root.is_empty() { "/" } else { root }
}

fn set_cookie(response: &mut Response, cookie: &str) {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
}

pub(super) async fn login(
    State(app): State<Shared>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Result<Response, Failure> {
    let root = base(&original, &uri);
    if app.sessions.is_read_only() {
        return Err(Failure::Forbidden("this dashboard is read-only".into()));
    }
    if app.sessions.throttled() {
        return Err(Failure::Throttled(
            "too many failed sign-ins: try again in a minute".into(),
        ));
    }
    if !app.sessions.login_form_ok(&headers, form.csrf.as_deref()) {
        return Ok(Redirect::to(&format!("{root}/login?failed=form")).into_response());
    }
    let Some(session) = app.sessions.sign_in(&form.token.unwrap_or_default()) else {
        return Ok(Redirect::to(&format!("{root}/login?failed=token")).into_response());
    };
    let path = cookie_path(&root);
    let mut response = back(&root, "/", Done::SignedIn);
    set_cookie(
        &mut response,
        &format!(
            "{SESSION_COOKIE}={session}; Path={path}; Max-Age={}; HttpOnly; SameSite=Strict",
            SESSION_LIFETIME.as_secs()
        ),
    );
    set_cookie(
        &mut response,
        &format!("{LOGIN_COOKIE}=; Path={path}; Max-Age=0; HttpOnly; SameSite=Strict"),
    );
    Ok(response)
}

pub(super) async fn logout(
    State(app): State<Shared>,
    action: Allowed,
) -> Result<Response, Failure> {
    if let Caller::Session { id, .. } = &action.caller {
        app.sessions.sign_out(id);
    }
    let path = cookie_path(&action.root);
    let mut response = action.back("/", Done::SignedOut);
    set_cookie(
        &mut response,
        &format!("{SESSION_COOKIE}=; Path={path}; Max-Age=0; HttpOnly; SameSite=Strict"),
    );
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
    known_dataset(&app, &id).await?;
    app.manager.queue(&id).pause().await?;
    Ok(action.back(&dataset_page(&id), Done::Paused))
}

pub(super) async fn resume(
    State(app): State<Shared>,
    Path(id): Path<String>,
    action: Allowed,
) -> Result<Response, Failure> {
    known_dataset(&app, &id).await?;
    app.manager.queue(&id).resume().await?;
    Ok(action.back(&dataset_page(&id), Done::Resumed))
}

pub(super) async fn unthrottle(
    State(app): State<Shared>,
    Path(id): Path<String>,
    action: Allowed,
) -> Result<Response, Failure> {
    known_dataset(&app, &id).await?;
    app.manager.queue(&id).unthrottle().await?;
    Ok(action.back(&dataset_page(&id), Done::Unthrottled))
}

/// A shared limit's throttle, with its datasets'.
pub(super) async fn unthrottle_limit(
    State(app): State<Shared>,
    Path(name): Path<String>,
    action: Allowed,
) -> Result<Response, Failure> {
    match app.manager.unthrottle_limit(&name).await? {
        Some(_) => Ok(action.back("/", Done::Unthrottled)),
        None => Err(Failure::NotFound(format!("no shared limit {name:?}"))),
    }
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
    known_dataset(&app, &id).await?;
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
    let adaptive = match text(&form.adaptive).as_deref() {
        None => None,
        Some("on") => Some(true),
        Some("off") => Some(false),
        Some(other) => {
            return Err(Failure::BadRequest(format!(
                "adaptive: on or off, not {other:?}"
            )));
        }
    };
    let update = LimitsUpdate {
        rate_limit: rate,
        max_concurrency: concurrency,
        weight,
        adaptive,
    };
    let queue = app.manager.queue(&id);
    queue.update_limits(update).await?;
    // The shared limits it uses, comma-separated; `none` for none.
    if let Some(uses) = text(&form.uses) {
        let uses: Vec<String> = uses
            .split(',')
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty() && u != "none")
            .collect();
        queue
            .use_limits(&uses)
            .await
            .map_err(|e| match e.refused_reference() {
                Some(_) => Failure::BadRequest("shared_limits: no limit of that name".into()),
                None => Failure::from(e),
            })?;
    }
    Ok(action.back(&dataset_page(&id), Done::Limits))
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
    known_dataset(&app, &id).await?;
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
    Ok(action.back(&dataset_page(&id), Done::Retried(n)))
}

pub(super) async fn cancel_matching(
    State(app): State<Shared>,
    Path(id): Path<String>,
    action: Allowed,
) -> Result<Response, Failure> {
    known_dataset(&app, &id).await?;
    let form = &action.form;
    let n = app
        .manager
        .queue(&id)
        .cancel_matching(&matching(form))
        .await?;
    Ok(action.back(&dataset_page(&id), Done::CancelRequested(n)))
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
        Some(TaskStatus::Cancelled) => Done::Cancelled,
        Some(_) => Done::HandlerTold,
        None => Done::NothingToCancel,
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
        Done::Requeued
    } else {
        Done::NothingToRetry
    };
    Ok(action.back(&format!("/tasks/{id}"), done))
}
