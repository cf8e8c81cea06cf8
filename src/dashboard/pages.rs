//! The pages, as maud templates: every value is escaped unless marked
//! otherwise (nothing here is), so a dataset id or a payload cannot
//! inject markup.

use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;

use super::session::{LOGIN_COOKIE, LOGIN_LIFETIME};
use super::{Failure, Shared, chart};
use crate::manager::inspect::{OverviewQuery, OverviewSort, TaskFilter};
use crate::task::{TaskId, TaskStatus};

const STYLE: &str = include_str!("assets/style.css");
const SCRIPT: &str = include_str!("assets/live.js");

/// `sha256-…` of a text, as a content security policy names it.
fn csp_hash(text: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(text.as_bytes()))
    )
}

/// The hash of the inline style, for the content security policy.
pub(super) fn style_hash() -> String {
    csp_hash(STYLE)
}

/// The hash of the inline script, for the content security policy.
pub(super) fn script_hash() -> String {
    csp_hash(SCRIPT)
}

/// Datasets and tasks per page.
const PAGE: u32 = 50;

/// Where the dashboard is mounted: the request's original path minus the
/// path the router saw ("" when served alone, "/syncq" when nested there).
pub(super) fn base(original: &Uri, seen: &Uri) -> String {
    let full = original.path();
    let own = seen.path();
    full.strip_suffix(own)
        .unwrap_or("")
        .trim_end_matches('/')
        .to_string()
}

/// What every page knows about the request.
pub(super) struct Ctx {
    pub base: String,
    pub admin: bool,
    pub read_only: bool,
    pub csrf: String,
    pub refresh_ms: u128,
}

impl Ctx {
    pub(super) fn new(app: &Shared, original: &Uri, seen: &Uri, headers: &HeaderMap) -> Self {
        let caller = app.caller(headers);
        Ctx {
            base: base(original, seen),
            admin: caller.is_admin(),
            read_only: app.sessions.is_read_only(),
            csrf: caller.csrf().to_string(),
            refresh_ms: app.refresh.as_millis(),
        }
    }

    fn link(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A one-button form for an action, shown to signed-in operators only.
    fn action(&self, path: &str, label: &str, class: &str) -> Markup {
        html! {
            @if self.admin {
                form.inline method="post" action=(self.link(path)) {
                    input type="hidden" name="csrf" value=(self.csrf);
                    button.(class) type="submit" { (label) }
                }
            }
        }
    }
}

fn layout(ctx: &Ctx, title: &str, flash: Option<&str>, body: Markup) -> Html<String> {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · syncq" }
                style { (PreEscaped(STYLE)) }
            }
            body data-refresh=(ctx.refresh_ms) {
                header {
                    a.brand href=(ctx.link("/")) { "syncq" }
                    nav {
                        a href=(ctx.link("/")) { "Overview" }
                        a href=(ctx.link("/workers")) { "Workers" }
                        a href=(ctx.link("/schedules")) { "Schedules" }
                    }
                    span.session {
                        @if ctx.read_only {
                            span.badge title="Set SYNCQ_DASHBOARD_TOKEN to allow actions" { "read-only" }
                        } @else if ctx.admin {
                            form.inline method="post" action=(ctx.link("/logout")) {
                                input type="hidden" name="csrf" value=(ctx.csrf);
                                button.link type="submit" { "Sign out" }
                            }
                        } @else {
                            a href=(ctx.link("/login")) { "Sign in to act" }
                        }
                        " · " span #live-state { "live" }
                    }
                }
                main {
                    h1 { (title) }
                    @if let Some(flash) = flash {
                        p.flash role="status" { (flash) }
                    }
                    (body)
                }
                script { (PreEscaped(SCRIPT)) }
            }
        }
    };
    Html(page.into_string())
}

/// An error as a small page.
pub(super) fn error_page(status: StatusCode, message: &str) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head { meta charset="utf-8"; title { "syncq: " (status.as_u16()) } style { (PreEscaped(STYLE)) } }
                body { main { h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) } p { (message) } p { a href="javascript:history.back()" { "Back" } } } }
            }
        }
        .into_string(),
    )
}

fn age(secs: Option<f64>) -> String {
    match secs {
        None => "-".into(),
        Some(s) if s < 1.0 => "<1s".into(),
        Some(s) if s < 120.0 => format!("{s:.0}s"),
        Some(s) if s < 7200.0 => format!("{:.0}m", s / 60.0),
        Some(s) => format!("{:.1}h", s / 3600.0),
    }
}

const SECONDS: &str = "%Y-%m-%d %H:%M:%S";
const MILLIS: &str = "%Y-%m-%d %H:%M:%S%.3f";

/// A time as the pages print it, or "-".
fn when(t: Option<chrono::DateTime<chrono::Utc>>, format: &str) -> String {
    t.map_or("-".to_string(), |t| t.format(format).to_string())
}

fn window(secs: f64) -> String {
    if secs >= 1.0 && secs.fract() == 0.0 {
        format!("{secs:.0}s")
    } else {
        format!("{secs}s")
    }
}

fn pretty(value: Option<&serde_json::Value>) -> String {
    match value {
        None => "—".into(),
        Some(v) => serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()),
    }
}

/// Query of the overview.
#[derive(Debug, Default, Deserialize)]
pub(super) struct OverviewParams {
    q: Option<String>,
    sort: Option<String>,
    page: Option<u32>,
    done: Option<String>,
    n: Option<String>,
}

pub(super) async fn overview(
    State(app): State<Shared>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<OverviewParams>,
) -> Result<Html<String>, Failure> {
    let ctx = Ctx::new(&app, &original, &uri, &headers);
    let sort = match params.sort.as_deref() {
        Some("queued") => OverviewSort::Queued,
        Some("running") => OverviewSort::Running,
        _ => OverviewSort::Name,
    };
    let page = params.page.unwrap_or(0);
    let query = OverviewQuery {
        filter: params.q.clone(),
        sort,
        limit: Some(PAGE),
        offset: Some(page.saturating_mul(PAGE)),
    };
    let (rows, total) = app.manager.overview(&query).await?;
    let (activity, by_dataset) = app.activity().await?;
    let totals = app.manager.totals_with(&activity).await?;
    let minutes = &activity.minutes;
    let hour = |d: &str| by_dataset.get(d).copied().unwrap_or((0, 0));
    let q = params.q.clone().unwrap_or_default();
    let sort_name = params.sort.clone().unwrap_or_else(|| "name".into());
    let pages = (total.max(0) as u32).div_ceil(PAGE).max(1);
    let page_link = |p: u32| {
        format!(
            "{}?q={}&sort={}&page={p}",
            ctx.link("/"),
            urlencode(&q),
            urlencode(&sort_name)
        )
    };
    let limits = app.manager.limits().await?;
    let body = html! {
        section #live {
            div.totals {
                div { span.num data-live="queued" { (totals.queued) } span.label { "queued" } }
                div { span.num data-live="running" { (totals.running) } span.label { "running" } }
                div { span.num data-live="succeeded" { (totals.succeeded_last_hour) } span.label { "succeeded, last hour" } }
                div { span.num data-live="failed" { (totals.failed_last_hour) } span.label { "failed, last hour" } }
            }
            (chart::throughput(minutes))
            p.muted { (total) " dataset(s)" @if !q.is_empty() { " matching " q { (q) } } "." }
            table.datasets {
                thead { tr {
                    th { a href=(format!("{}?q={}&sort=name", ctx.link("/"), urlencode(&q))) { "Dataset" } }
                    th.n { a href=(format!("{}?q={}&sort=queued", ctx.link("/"), urlencode(&q))) { "Queued" } }
                    th.n { a href=(format!("{}?q={}&sort=running", ctx.link("/"), urlencode(&q))) { "Running" } }
                    th.n { "Succeeded 1h" } th.n { "Failed 1h" } th.n { "Oldest ready" }
                    th { "Rate limit (used)" } th.n { "Weight" } th { "State" }
                } }
                tbody {
                    @for d in &rows {
                        tr data-dataset=(d.dataset_id) {
                            td { a href=(ctx.link(&format!("/datasets/{}", urlencode(&d.dataset_id)))) { (d.dataset_id) } }
                            td.n data-live=(format!("queued:{}", d.dataset_id)) { (d.queued) }
                            td.n { (d.running) @if let Some(cap) = d.max_concurrency { " / " (cap) } }
                            td.n { (hour(&d.dataset_id).0) }
                            td.n.bad[hour(&d.dataset_id).1 > 0] { (hour(&d.dataset_id).1) }
                            td.n { (age(d.oldest_ready_age_secs)) }
                            td { @match d.rate_limit {
                                Some(n) => { (n) "/" (window(d.rate_window_secs)) " (" (d.rate_used) ")" },
                                None => "-",
                            } }
                            td.n { (d.weight) }
                            td { @if d.paused { span.state.paused { "paused" } }
                                 @else if d.throttled { span.state.throttled { "throttled" } }
                                 @else { span.state { "active" } } }
                        }
                    }
                }
            }
            @if !limits.is_empty() {
                h2 { "Shared limits" }
                table.limits {
                    thead { tr { th { "Limit" } th { "Windows (used / rate)" } th { "Running / cap" } th { "Throttled until" } th { "Datasets" } } }
                    tbody { @for l in &limits { tr {
                        td { (l.limit_id) }
                        td data-live=(format!("limit:{}", l.limit_id)) {
                            @for (i, r) in l.rates.iter().enumerate() {
                                @if i > 0 { ", " }
                                (r.used) " / " (r.rate_limit) " per " (window(r.rate_window_secs))
                            }
                            @if l.rates.is_empty() { "-" }
                        }
                        td { @match l.max_concurrency { Some(c) => { (l.running) " / " (c) }, None => "-" } }
                        td { (when(l.throttled_until, SECONDS))
                             @if let Some(e) = l.effective_rate { " · adaptive, now " (format!("{e:.2}")) }
                             @if l.throttled {
                                 " " (ctx.action(&format!("/limits/{}/unthrottle", urlencode(&l.limit_id)), "Unthrottle", "primary"))
                             } }
                        td { @for (i, d) in l.datasets.iter().enumerate() {
                            @if i > 0 { ", " }
                            a href=(ctx.link(&format!("/datasets/{}", urlencode(d)))) { (d) }
                        } }
                    } } }
                }
            }
        }
        form.filters method="get" action=(ctx.link("/")) {
            input type="search" name="q" value=(q) placeholder="Filter datasets by name";
            input type="hidden" name="sort" value=(sort_name);
            button type="submit" { "Filter" }
        }
        nav.pager {
            @if page > 0 { a href=(page_link(page - 1)) { "← previous" } }
            span { "page " (page + 1) " of " (pages) }
            @if page + 1 < pages { a href=(page_link(page + 1)) { "next →" } }
        }
    };
    let flash = Done::text(&params.done, &params.n);
    Ok(layout(&ctx, "Overview", flash.as_deref(), body))
}

/// Query of a dataset's page.
#[derive(Debug, Default, Deserialize)]
pub(super) struct DatasetParams {
    kind: Option<String>,
    status: Option<String>,
    error: Option<String>,
    page: Option<u32>,
    done: Option<String>,
    n: Option<String>,
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.clone().filter(|s| !s.is_empty())
}

pub(super) async fn dataset(
    State(app): State<Shared>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(params): Query<DatasetParams>,
) -> Result<Html<String>, Failure> {
    let ctx = Ctx::new(&app, &original, &uri, &headers);
    let queue = app.manager.queue(&id);
    let settings = match queue.settings().await? {
        Some(settings) => settings,
        // Tasks enqueued, no claim yet: the defaults hold.
        None if app.manager.dataset_exists(&id).await? => crate::QueueSettings {
            dataset_id: id.clone(),
            rate_limit: None,
            rate_window_secs: 1.0,
            max_concurrency: None,
            paused: false,
            throttled_until: None,
            throttled: false,
            weight: 1,
            adaptive: false,
            effective_rate: None,
        },
        None => return Err(Failure::NotFound(format!("no dataset {id:?}"))),
    };
    let counts = queue.counts().await?;
    // What holds it back for the upstream: its own throttle, or the
    // latest of its shared limits'.
    // By the database's clock (the rows' `throttled`).
    let own_throttle = settings.throttled_until.filter(|_| settings.throttled);
    let limit_throttle = app
        .manager
        .limits()
        .await?
        .into_iter()
        .filter(|l| l.datasets.contains(&id))
        .filter_map(|l| Some((l.throttled_until.filter(|_| l.throttled)?, l.limit_id)))
        .max();
    let status: Option<TaskStatus> = non_empty(&params.status).and_then(|s| s.parse().ok());
    let page = params.page.unwrap_or(0);
    let filter = TaskFilter {
        dataset_id: Some(id.clone()),
        status,
        kind: non_empty(&params.kind),
        error_contains: non_empty(&params.error),
        limit: Some(PAGE),
        offset: Some(page.saturating_mul(PAGE)),
        // The list shows no payload: it reads none.
        without_values: true,
    };
    let tasks = app.manager.tasks(&filter).await?;
    let errors = app.manager.failures_by_error(&id).await?;
    let minutes = app.manager.throughput(Some(&id)).await?;
    let path = |p: &str| ctx.link(&format!("/datasets/{}{p}", urlencode(&id)));
    let kind = params.kind.clone().unwrap_or_default();
    let error = params.error.clone().unwrap_or_default();
    let status_name = params.status.clone().unwrap_or_default();
    let body = html! {
        section #live {
            div.totals {
                div { span.num data-live="queued" { (counts.queued) } span.label { "queued" } }
                div { span.num data-live="running" { (counts.running) } span.label { "running" } }
                div { span.num { (counts.starts_in_window) } span.label { "starts in the rate window" } }
            }
            dl.settings {
                dt { "Rate limit" } dd { @match settings.rate_limit {
                    Some(n) => { (n) " per " (window(settings.rate_window_secs))
                        @if let Some(e) = settings.effective_rate { " · adaptive, now " (format!("{e:.2}")) } },
                    None => "none" } }
                dt { "Concurrency cap" } dd { @match settings.max_concurrency { Some(n) => (n), None => "none" } }
                dt { "Weight" } dd { (settings.weight) }
                dt { "State" } dd { @if settings.paused { "paused" } @else { "active" }
                    @if let Some(until) = own_throttle { " · throttled until " (until.format("%Y-%m-%d %H:%M:%S UTC")) " (upstream)" }
                    @if let Some((until, limit)) = &limit_throttle { " · throttled until " (until.format("%Y-%m-%d %H:%M:%S UTC")) " (shared limit " (limit) ")" } }
            }
            (chart::throughput(&minutes))
            h2 { "Tasks" }
            table.tasks {
                thead { tr { th { "ID" } th { "Kind" } th { "Status" } th.n { "Attempts" } th { "Run at" } th { "Last error" } } }
                tbody {
                    @for t in &tasks {
                        tr {
                            td { a href=(ctx.link(&format!("/tasks/{}", t.id))) { (t.id) } }
                            td { (t.kind) }
                            td { span.status.(t.status.as_str()) { (t.status) } }
                            td.n { (t.attempts) "/" (t.max_attempts) }
                            td { (t.run_at.format("%Y-%m-%d %H:%M:%S")) }
                            td.error { (t.last_error.as_deref().map(|e| truncate(e, 120)).unwrap_or_default()) }
                        }
                    }
                }
            }
            @if tasks.is_empty() { p.muted { "No task matches." } }
            h2 { "Failures of the last day, by error" }
            @if errors.is_empty() { p.muted { "None." } }
            @else {
                table.errors {
                    thead { tr { th { "Error" } th.n { "Attempts" } th.n { "Tasks" } th { "Last" } th { "Latest task" } } }
                    tbody { @for g in &errors { tr {
                        td.error { (g.error) } td.n { (g.attempts) } td.n { (g.tasks) }
                        td { (g.last_at.format("%H:%M:%S")) }
                        td { a href=(ctx.link(&format!("/tasks/{}", g.example))) { (g.example) } }
                    } } }
                }
            }
        }
        form.filters method="get" action=(path("")) {
            input type="text" name="kind" value=(kind) placeholder="kind";
            select name="status" {
                option value="" selected[status_name.is_empty()] { "any status" }
                @for s in TaskStatus::ALL {
                    option value=(s.as_str()) selected[status_name == s.as_str()] { (s.as_str()) }
                }
            }
            input type="text" name="error" value=(error) placeholder="text in the last error";
            button type="submit" { "Filter" }
        }
        nav.pager {
            @if page > 0 { a href=(format!("{}?kind={}&status={}&error={}&page={}", path(""), urlencode(&kind), urlencode(&status_name), urlencode(&error), page - 1)) { "← newer" } }
            @if tasks.len() as u32 == PAGE { a href=(format!("{}?kind={}&status={}&error={}&page={}", path(""), urlencode(&kind), urlencode(&status_name), urlencode(&error), page + 1)) { "older →" } }
        }
        @if ctx.admin {
            section.actions {
                h2 { "Actions" }
                @if settings.paused { (ctx.action(&format!("/datasets/{}/resume", urlencode(&id)), "Resume", "primary")) }
                @else { (ctx.action(&format!("/datasets/{}/pause", urlencode(&id)), "Pause", "danger")) }
                @if own_throttle.is_some() || settings.effective_rate.is_some_and(|e| settings.rate_limit.is_some_and(|n| e < f64::from(n))) {
                    (ctx.action(&format!("/datasets/{}/unthrottle", urlencode(&id)), "Unthrottle", "primary"))
                }
                @if let Some((_, limit)) = &limit_throttle {
                    (ctx.action(&format!("/limits/{}/unthrottle", urlencode(limit)), &format!("Unthrottle shared limit {limit}"), "primary"))
                }
                form method="post" action=(path("/limits")) {
                    input type="hidden" name="csrf" value=(ctx.csrf);
                    label { "Rate " input type="text" name="rate" placeholder="100/1s or none"; }
                    label { "Cap " input type="text" name="concurrency" placeholder="N or none"; }
                    label { "Weight " input type="number" name="weight" min="1" max="1000"; }
                    label { "Shared limits " input type="text" name="uses" placeholder="token-a,token-b or none"; }
                    label { "Adaptive " select name="adaptive" {
                        option value="" selected { "unchanged" } option value="on" { "on" } option value="off" { "off" } } }
                    button type="submit" { "Change limits" }
                }
                form method="post" action=(path("/retry")) {
                    input type="hidden" name="csrf" value=(ctx.csrf);
                    input type="hidden" name="kind" value=(kind);
                    input type="hidden" name="error" value=(error);
                    select name="status" { option value="failed" { "failed" } option value="cancelled" { "cancelled" } }
                    button type="submit" { "Retry all matching the filter" }
                }
                form method="post" action=(path("/cancel")) {
                    input type="hidden" name="csrf" value=(ctx.csrf);
                    input type="hidden" name="kind" value=(kind);
                    input type="hidden" name="error" value=(error);
                    button.danger type="submit" { "Cancel all queued and running matching the filter" }
                }
            }
        }
    };
    let flash = Done::text(&params.done, &params.n);
    Ok(layout(
        &ctx,
        &format!("Dataset {id}"),
        flash.as_deref(),
        body,
    ))
}

/// Query of a task's page.
#[derive(Debug, Default, Deserialize)]
pub(super) struct TaskParams {
    done: Option<String>,
    n: Option<String>,
    /// The page of its errors (0: the newest).
    errors: Option<u32>,
}

pub(super) async fn task(
    State(app): State<Shared>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(params): Query<TaskParams>,
) -> Result<Html<String>, Failure> {
    let ctx = Ctx::new(&app, &original, &uri, &headers);
    let id: TaskId = id
        .parse()
        .map_err(|_| Failure::NotFound(format!("no task {id:?}")))?;
    let Some(t) = app.manager.task(id).await? else {
        return Err(Failure::NotFound(format!("no task {id}")));
    };
    // A page of its errors, newest first: a task that kept answering
    // "rate limited" can have thousands.
    let errors_page = params.errors.unwrap_or(0);
    let (errors, errors_total) = app
        .manager
        .task_errors_page(id, PAGE, u64::from(errors_page) * u64::from(PAGE))
        .await?;
    let errors_pages = (errors_total.max(0) as u64)
        .div_ceil(u64::from(PAGE))
        .max(1);
    let errors_link = |p: u32| ctx.link(&format!("/tasks/{id}?errors={p}"));
    let time = |t| when(t, MILLIS);
    let body = html! {
        section #live {
            dl.settings {
                dt { "Dataset" } dd { a href=(ctx.link(&format!("/datasets/{}", urlencode(&t.dataset_id)))) { (t.dataset_id) } }
                dt { "Kind" } dd { (t.kind) }
                dt { "Status" } dd { span.status.(t.status.as_str()) data-live="status" { (t.status) }
                    @if t.cancel_requested { " (cancel requested)" } }
                dt { "Attempts" } dd { (t.attempts) " of " (t.max_attempts)
                    @if t.snoozes > 0 { " · snoozed " (t.snoozes) " time(s)" } }
                dt { "Priority" } dd { (t.priority) }
                dt { "Run at" } dd { (t.run_at.format("%Y-%m-%d %H:%M:%S%.3f")) }
                dt { "Created" } dd { (t.created_at.format("%Y-%m-%d %H:%M:%S%.3f")) }
                dt { "Started" } dd { (time(t.started_at)) }
                dt { "Finished" } dd { (time(t.finished_at)) }
                dt { "Held by" } dd { (t.locked_by.as_deref().unwrap_or("-")) }
                dt { "Unique key" } dd { (t.unique_key.as_deref().unwrap_or("-")) }
            }
            @if let Some(why) = &t.unreadable {
                p.flash.bad role="alert" { (why) " — shown as text." }
            }
            h2 { "Payload" } pre { (pretty(Some(&t.payload))) }
            h2 { "Checkpoint" } pre { (pretty(t.checkpoint.as_ref())) }
            h2 { "Result" } pre { (pretty(t.result.as_ref())) }
            h2 { "Attempts' errors" }
            @if errors_total > 0 { p.muted { (errors_total) " in all, newest first." } }
            @if errors.is_empty() { p.muted { "None." } }
            @else {
                table.errors {
                    thead { tr { th.n { "Attempt" } th { "Worker" } th { "At" } th { "Error" } } }
                    tbody { @for e in &errors { tr {
                        td.n { (e.attempt) } td { (e.worker_id.as_deref().unwrap_or("-")) }
                        td { (e.at.format("%Y-%m-%d %H:%M:%S%.3f")) } td.error { (e.error) }
                    } } }
                }
                @if errors_pages > 1 {
                    nav.pager {
                        @if errors_page > 0 { a href=(errors_link(errors_page - 1)) { "← newer" } }
                        span { "page " (errors_page + 1) " of " (errors_pages) }
                        @if u64::from(errors_page) + 1 < errors_pages { a href=(errors_link(errors_page + 1)) { "older →" } }
                    }
                }
            }
        }
        @if ctx.admin {
            section.actions {
                @if matches!(t.status, TaskStatus::Queued | TaskStatus::Running) {
                    (ctx.action(&format!("/tasks/{id}/cancel"), "Cancel", "danger"))
                }
                @if matches!(t.status, TaskStatus::Failed | TaskStatus::Cancelled) {
                    (ctx.action(&format!("/tasks/{id}/retry"), "Retry", "primary"))
                }
            }
        }
    };
    let flash = Done::text(&params.done, &params.n);
    Ok(layout(&ctx, &format!("Task {id}"), flash.as_deref(), body))
}

pub(super) async fn workers(
    State(app): State<Shared>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Html<String>, Failure> {
    let ctx = Ctx::new(&app, &original, &uri, &headers);
    let live = app.manager.live_workers().await?;
    let stale = app.manager.stale_workers().await?;
    let body = html! {
        section #live {
            p.muted { span data-live="workers" { (live.len()) } " live worker process(es)." }
            table.workers {
                thead { tr { th { "Worker" } th { "Host" } th.n { "PID" } th { "Kinds" } th.n { "Concurrency" } th.n { "Holding" } th { "Last heartbeat" } } }
                tbody { @for w in &live { tr {
                    td { (w.worker_id) } td { (w.host) } td.n { (w.pid) } td { (w.kinds.join(", ")) }
                    td.n { (w.concurrency) } td.n { (w.running) } td { (age(Some(w.heartbeat_age_secs))) " ago" }
                } } }
            }
            @if !stale.is_empty() {
                h2 { "Silent" }
                p.muted { "Registered, but their heartbeat stopped: their tasks come back when their leases expire." }
                ul { @for w in &stale { li { (w.host) ":" (w.pid) " — last beat " (age(Some(w.silent_secs))) " ago" } } }
            }
        }
    };
    Ok(layout(&ctx, "Workers", None, body))
}

pub(super) async fn schedules(
    State(app): State<Shared>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Html<String>, Failure> {
    let ctx = Ctx::new(&app, &original, &uri, &headers);
    let all = app.manager.schedules().await?;
    let time = |t| when(t, SECONDS);
    let body = html! {
        section #live {
            @if all.is_empty() { p.muted { "No schedule." } }
            @else {
                table.schedules {
                    thead { tr { th { "Schedule" } th { "Dataset" } th { "Kind" } th { "When" } th { "Next run" } th { "Last run" } th { "Last task" } th.n { "Skipped" } } }
                    tbody { @for s in &all { tr {
                        td { (s.schedule_id) }
                        td { a href=(ctx.link(&format!("/datasets/{}", urlencode(&s.dataset_id)))) { (s.dataset_id) } }
                        td { (s.kind) }
                        td { @match (&s.cron, s.every_secs) {
                            (Some(c), _) => { (c) " (" (s.timezone) ")" },
                            (None, Some(e)) => { "every " (window(e)) },
                            _ => "-",
                        } }
                        td { @if let Some(e) = &s.error { span.bad { "error: " (e) } }
                             @else if s.paused { "paused" } @else { (time(s.next_run_at)) } }
                        td { (time(s.last_run_at)) }
                        td { @if let Some(id) = s.last_task_id {
                            a href=(ctx.link(&format!("/tasks/{id}"))) { (id) }
                            " " (s.last_task_status.map_or("(pruned)".to_string(), |st| st.to_string()))
                        } @else { "-" } }
                        td.n { (s.skipped_ticks) }
                    } } }
                }
            }
        }
    };
    Ok(layout(&ctx, "Schedules", None, body))
}

/// Query of the sign-in page.
#[derive(Debug, Default, Deserialize)]
pub(super) struct LoginParams {
    failed: Option<String>,
}

/// The sign-in page. Its form carries a CSRF token tied to a cookie set
/// here (see `session.rs`): a form another site posts cannot sign in.
pub(super) async fn login(
    State(app): State<Shared>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<LoginParams>,
) -> Response {
    let ctx = Ctx::new(&app, &original, &uri, &headers);
    let (cookie, csrf) = app.sessions.login_form();
    let failed = match params.failed.as_deref() {
        Some("form") => Some("That sign-in form had expired: sign in again."),
        Some(_) => Some("That is not the admin token."),
        None => None,
    };
    let body = html! {
        @if ctx.read_only {
            p { "This dashboard is read-only: no admin token is configured (SYNCQ_DASHBOARD_TOKEN)." }
        } @else {
            @if let Some(failed) = failed { p.flash.bad role="alert" { (failed) } }
            form.login method="post" action=(ctx.link("/login")) {
                input type="hidden" name="csrf" value=(csrf);
                label { "Admin token " input #token type="password" name="token" autocomplete="current-password" required; }
                button #sign-in type="submit" { "Sign in" }
            }
        }
    };
    let mut response = layout(&ctx, "Sign in", None, body).into_response();
    if !ctx.read_only {
        let path = if ctx.base.is_empty() {
            "/"
        } else {
            ctx.base.as_str()
        };
        let cookie = format!(
            "{LOGIN_COOKIE}={cookie}; Path={path}; Max-Age={}; HttpOnly; SameSite=Strict",
            LOGIN_LIFETIME.as_secs()
        );
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    response
}

/// What an action did, named in the redirect back by a code: the page
/// shows a fixed text for each (a link cannot make the dashboard say
/// anything else), and a count where there is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Done {
    SignedIn,
    SignedOut,
    Paused,
    Resumed,
    Limits,
    Retried(u64),
    CancelRequested(u64),
    Cancelled,
    HandlerTold,
    NothingToCancel,
    Requeued,
    NothingToRetry,
    Unthrottled,
}

impl Done {
    const ALL: [Done; 13] = [
        Done::SignedIn,
        Done::SignedOut,
        Done::Paused,
        Done::Resumed,
        Done::Limits,
        Done::Retried(0),
        Done::CancelRequested(0),
        Done::Cancelled,
        Done::HandlerTold,
        Done::NothingToCancel,
        Done::Requeued,
        Done::NothingToRetry,
        Done::Unthrottled,
    ];

    pub(super) fn code(self) -> &'static str {
        match self {
            Done::SignedIn => "signed-in",
            Done::SignedOut => "signed-out",
            Done::Paused => "paused",
            Done::Resumed => "resumed",
            Done::Limits => "limits",
            Done::Retried(_) => "retried",
            Done::CancelRequested(_) => "cancel-requested",
            Done::Cancelled => "cancelled",
            Done::HandlerTold => "handler-told",
            Done::NothingToCancel => "nothing-to-cancel",
            Done::Requeued => "requeued",
            Done::NothingToRetry => "nothing-to-retry",
            Done::Unthrottled => "unthrottled",
        }
    }

    pub(super) fn count(self) -> Option<u64> {
        match self {
            Done::Retried(n) | Done::CancelRequested(n) => Some(n),
            _ => None,
        }
    }

    fn message(self) -> String {
        match self {
            Done::SignedIn => "Signed in.".into(),
            Done::SignedOut => "Signed out.".into(),
            Done::Paused => "Paused.".into(),
            Done::Resumed => "Resumed.".into(),
            Done::Limits => "Limits changed.".into(),
            Done::Retried(n) => format!("{n} task(s) queued again."),
            Done::CancelRequested(n) => format!("Cancel requested for {n} task(s)."),
            Done::Cancelled => "Cancelled.".into(),
            Done::HandlerTold => "Cancel requested: its handler was told.".into(),
            Done::NothingToCancel => "Nothing to cancel: the task is not queued or running.".into(),
            Done::Requeued => "Queued again.".into(),
            Done::NothingToRetry => {
                "Nothing to retry: only failed or cancelled tasks can be retried.".into()
            }
            Done::Unthrottled => "Throttle lifted.".into(),
        }
    }

    /// The flash text for `?done=…&n=…`: None for a code it does not know.
    pub(super) fn text(code: &Option<String>, n: &Option<String>) -> Option<String> {
        let code = code.as_deref()?;
        let n = n
            .as_deref()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        let done = Done::ALL.into_iter().find(|d| d.code() == code)?;
        Some(
            match done {
                Done::Retried(_) => Done::Retried(n),
                Done::CancelRequested(_) => Done::CancelRequested(n),
                other => other,
            }
            .message(),
        )
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let cut: String = s.chars().take(n).collect();
        format!("{cut}…")
    }
}

/// Percent-encodes a path segment or query value.
pub(super) fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
