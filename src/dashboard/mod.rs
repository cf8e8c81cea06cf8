//! The web dashboard: see and steer the fleet from a browser.
//!
//! [`router`] is an axum [`Router`] a service can mount in its own app (as
//! Oban Web mounts in a Phoenix app); `syncq dashboard` serves the same
//! router on its own. Pages: the overview (every dataset, paged, with a
//! throughput chart), a dataset, a task, the workers, the schedules. Pages
//! refresh their numbers in place every few seconds while the tab is
//! visible (a light poll of the same page; no reload).
//!
//! It is read-only unless an admin token is configured
//! ([`DashboardOptions::token`], `SYNCQ_DASHBOARD_TOKEN` for the command; at
//! least [`MIN_TOKEN_LEN`] bytes). With one, an operator signs in with it
//! (a session cookie derived from the token, `HttpOnly`, `SameSite=Strict`,
//! 12 hours, revoked by signing out) or sends it as `Authorization: Bearer
//! …`; every action is a POST, and one from a session must also carry that
//! session's CSRF token, which only the pages shown to it hold. Failed
//! sign-ins are throttled (see `session.rs`). Actions go through the same library calls as the
//! CLI (`TaskQueue::pause`, `update_limits`, `TaskQueueManager::cancel`,
//! `retry`, …) and leave the same rows.
//!
//! Everything it needs is in the binary (HTML from maud, its CSS and its
//! script inline, charts drawn here as SVG): it works offline.
//!
//! ```no_run
//! # async fn example(db: sqlx::PgPool) -> std::io::Result<()> {
//! use syncq::dashboard::{DashboardOptions, router};
//!
//! let app = axum::Router::new().nest(
//!     "/syncq",
//!     router(db, DashboardOptions::from_env()),
//! );
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await
//! # }
//! ```

mod actions;
mod chart;
mod pages;
mod session;

pub use session::MIN_TOKEN_LEN;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::db::Db;
use crate::manager::TaskQueueManager;
use crate::manager::inspect::Activity;

/// How the dashboard behaves.
#[derive(Clone, Default)]
pub struct DashboardOptions {
    token: Option<String>,
    refresh: Option<Duration>,
    hosts: Option<Vec<String>>,
    connections: Option<u32>,
}

impl std::fmt::Debug for DashboardOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DashboardOptions")
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("refresh", &self.refresh)
            .field("hosts", &self.hosts)
            .field("connections", &self.connections)
            .finish()
    }
}

impl DashboardOptions {
    /// The admin token: with it, signed-in operators may act; without, the
    /// dashboard is read-only. An empty token counts as none.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.token = (!token.is_empty()).then_some(token);
        self
    }

    /// The token from `SYNCQ_DASHBOARD_TOKEN`, if set.
    pub fn from_env() -> Self {
        match std::env::var("SYNCQ_DASHBOARD_TOKEN") {
            Ok(token) => DashboardOptions::default().token(token),
            Err(_) => DashboardOptions::default(),
        }
    }

    /// How often a visible page refreshes its numbers (default 2 s).
    pub fn refresh(mut self, every: Duration) -> Self {
        self.refresh = Some(every);
        self
    }

    /// The only `Host` names (without port) requests may carry; any other
    /// is answered 400. A dashboard on loopback should list its own names:
    /// otherwise a web page whose DNS name is rebound to 127.0.0.1 can read
    /// it, payloads included. Unset (the default for a mounted router):
    /// every host.
    pub fn hosts(mut self, hosts: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.hosts = Some(
            hosts
                .into_iter()
                .map(|h| h.into().to_ascii_lowercase())
                .collect(),
        );
        self
    }

    /// The most connections the dashboard's own pool opens (default
    /// [`DASHBOARD_CONNECTIONS`]); see [`router`].
    pub fn connections(mut self, n: u32) -> Self {
        self.connections = Some(n.max(1));
        self
    }

    /// Whether actions are possible (an admin token is set).
    pub fn is_read_only(&self) -> bool {
        self.token.is_none()
    }

    /// Refuses an admin token shorter than [`MIN_TOKEN_LEN`] bytes (a
    /// router given one stays read-only, and logs why).
    pub fn check(&self) -> Result<(), String> {
        match &self.token {
            Some(t) if t.len() < MIN_TOKEN_LEN => Err(format!(
                "the admin token is {} bytes; it must be at least {MIN_TOKEN_LEN} (e.g. openssl rand -hex 16)",
                t.len()
            )),
            _ => Ok(()),
        }
    }
}

/// What every handler shares.
struct App {
    manager: TaskQueueManager,
    /// Who is signed in (the admin token, sessions, CSRF tokens).
    sessions: session::Sessions,
    refresh: Duration,
    /// The last hour's activity, shared by every viewer (see
    /// [`App::activity`]).
    activity: tokio::sync::Mutex<Option<Recent>>,
}

/// The last hour's activity as last computed.
struct Recent {
    at: Instant,
    took: Duration,
    activity: Arc<Activity>,
    /// Per dataset: (succeeded, failed) in the last hour.
    by_dataset: Arc<HashMap<String, (i64, i64)>>,
    /// The next is being computed.
    refreshing: bool,
}

type Shared = Arc<App>;

impl App {
    /// The last hour's activity (a pass over the hour's finished tasks),
    /// shared by every viewer and recomputed at most once per refresh
    /// interval — or per five times what the pass took, when that is
    /// longer: a busy fleet watched by many tabs costs the database one
    /// pass at a time. Once there is one, a stale copy is answered at
    /// once while the next is computed in the background.
    async fn activity(
        self: &Arc<Self>,
    ) -> Result<(Arc<Activity>, Arc<HashMap<String, (i64, i64)>>), Failure> {
        let mut recent = self.activity.lock().await;
        if let Some(r) = recent.as_mut() {
            let stale = r.at.elapsed() >= self.refresh.max(r.took * 5);
            if stale && !r.refreshing {
                r.refreshing = true;
                let app = self.clone();
                tokio::spawn(async move {
                    let fresh = app.compute_activity().await;
                    let mut recent = app.activity.lock().await;
                    match fresh {
                        Ok(fresh) => *recent = Some(fresh),
                        Err(_) => {
                            if let Some(r) = recent.as_mut() {
                                r.refreshing = false;
                            }
                        }
                    }
                });
            }
            return Ok((r.activity.clone(), r.by_dataset.clone()));
        }
        let fresh = self.compute_activity().await?;
        let out = (fresh.activity.clone(), fresh.by_dataset.clone());
        *recent = Some(fresh);
        Ok(out)
    }

    async fn compute_activity(&self) -> Result<Recent, Failure> {
        let started = Instant::now();
        let activity = self.manager.activity().await?;
        let by_dataset: HashMap<String, (i64, i64)> = activity
            .datasets
            .iter()
            .map(|(d, s, f)| (d.clone(), (*s, *f)))
            .collect();
        Ok(Recent {
            at: Instant::now(),
            took: started.elapsed(),
            activity: Arc::new(activity),
            by_dataset: Arc::new(by_dataset),
            refreshing: false,
        })
    }

    /// Who sent this request (see [`session::Sessions::caller`]).
    fn caller(&self, headers: &HeaderMap) -> session::Caller {
        self.sessions.caller(headers)
    }
}

/// The dashboard's own pool's size by default.
pub const DASHBOARD_CONNECTIONS: u32 = 4;
/// The longest any of the dashboard's queries may run.
pub const DASHBOARD_STATEMENT_TIMEOUT: &str = "5s";

/// A pool of the dashboard's own, to the same database as `db`: at most
/// `size` connections, each query stopped after
/// [`DASHBOARD_STATEMENT_TIMEOUT`] (a startup parameter; not through a
/// transaction pooler, which refuses unknown ones: set it on the pooler's
/// side there). Visitors then never wait for, nor hold, the connections a
/// service's workers claim with — ten slow pages at once took the
/// overview from 6 ms to 4 s on a shared pool of 8. Outside a tokio
/// runtime (a pool needs one for its upkeep) the given pool is used.
fn own_pool(db: Db, size: u32) -> Db {
    if tokio::runtime::Handle::try_current().is_err() {
        tracing::warn!("dashboard: built outside a tokio runtime; it shares the given pool");
        return db;
    }
    let mut connect = (*db.pool().connect_options()).clone();
    if db.pooler() == crate::db::Pooler::None {
        connect = connect.options([("statement_timeout", DASHBOARD_STATEMENT_TIMEOUT)]);
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(connect);
    Db::new(pool).with_pooler(db.pooler())
}

/// The dashboard as an axum router, to serve alone or to `nest` in an app.
/// Links are relative to where it is mounted. It queries through a small
/// pool of its own to `db`'s database (see [`DashboardOptions::connections`]),
/// each query bounded by [`DASHBOARD_STATEMENT_TIMEOUT`].
pub fn router(db: impl Into<Db>, options: DashboardOptions) -> Router {
    let db = own_pool(
        db.into(),
        options.connections.unwrap_or(DASHBOARD_CONNECTIONS),
    );
    let token = match options.check() {
        Ok(()) => options.token,
        Err(e) => {
            tracing::error!("dashboard: {e}; it stays read-only");
            None
        }
    };
    let app: Shared = Arc::new(App {
        manager: TaskQueueManager::new(db),
        sessions: session::Sessions::new(token),
        refresh: options.refresh.unwrap_or(Duration::from_secs(2)),
        activity: tokio::sync::Mutex::new(None),
    });
    let hosts = Arc::new(options.hosts);
    Router::new()
        .route("/", get(pages::overview))
        .route("/datasets/{id}", get(pages::dataset))
        .route("/tasks/{id}", get(pages::task))
        .route("/workers", get(pages::workers))
        .route("/schedules", get(pages::schedules))
        .route("/login", get(pages::login).post(actions::login))
        .route("/logout", post(actions::logout))
        .route("/datasets/{id}/pause", post(actions::pause))
        .route("/datasets/{id}/resume", post(actions::resume))
        .route("/datasets/{id}/limits", post(actions::limits))
        .route("/datasets/{id}/unthrottle", post(actions::unthrottle))
        .route("/limits/{name}/unthrottle", post(actions::unthrottle_limit))
        .route("/datasets/{id}/retry", post(actions::retry_matching))
        .route("/datasets/{id}/cancel", post(actions::cancel_matching))
        .route("/tasks/{id}/cancel", post(actions::cancel_task))
        .route("/tasks/{id}/retry", post(actions::retry_task))
        .with_state(app)
        .layer(axum::middleware::map_response(secure_headers))
        .layer(axum::middleware::from_fn(move |request, next| {
            known_host(hosts.clone(), request, next)
        }))
}

/// Refuses a request whose `Host` is not one of `hosts` (when set).
async fn known_host(
    hosts: Arc<Option<Vec<String>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(hosts) = hosts.as_ref() {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(host_name)
            .unwrap_or_default();
        if !hosts.contains(&host) {
            return Failure::BadRequest(
                "unknown Host: this dashboard answers only its own names".into(),
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// A `Host` header's name, lowercase, without its port (`[::1]:8080` →
/// `[::1]`).
fn host_name(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty() => {
            name.to_string()
        }
        _ => host,
    }
}

/// The headers every answer carries: a content security policy that
/// allows only the dashboard's own style and script (by hash) and no
/// framing, no MIME sniffing, no referrer.
async fn secure_headers(mut response: Response) -> Response {
    static CSP: std::sync::LazyLock<Option<header::HeaderValue>> = std::sync::LazyLock::new(|| {
        header::HeaderValue::from_str(&format!(
            "default-src 'none'; style-src '{}'; script-src '{}'; connect-src 'self'; img-src 'self' data:; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            pages::style_hash(),
            pages::script_hash()
        ))
        .ok()
    });
    let headers = response.headers_mut();
    if let Some(csp) = CSP.as_ref() {
        headers.insert(header::CONTENT_SECURITY_POLICY, csp.clone());
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Serves the dashboard on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    db: impl Into<Db>,
    options: DashboardOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(db, options))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A failure a page or an action answers with.
#[derive(Debug)]
enum Failure {
    /// The database failed.
    Database(String),
    /// No such dataset or task.
    NotFound(String),
    /// Not allowed: read-only, not signed in, or no CSRF token.
    Forbidden(String),
    /// Too many failed sign-ins of late.
    Throttled(String),
    /// The form was wrong.
    BadRequest(String),
}

impl From<crate::Error> for Failure {
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::Config { .. } | crate::Error::InvalidTask(_) => {
                Failure::BadRequest(e.to_string())
            }
            // Bad input the database refused (a NUL in a URL, SQLSTATE
            // class 22): the visitor's mistake, answered 400 with a fixed
            // text, not the database's message.
            crate::Error::Database(sqlx::Error::Database(d))
                if d.code().is_some_and(|c| c.starts_with("22")) =>
            {
                Failure::BadRequest("that is not a valid value for this page".into())
            }
            other => {
                // The database's own words stay in the log: a visitor sees
                // that it failed, not its internals.
                tracing::warn!(error = %other, "dashboard: a query failed");
                Failure::Database(
                    "the database did not answer; the dashboard's log says why".into(),
                )
            }
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Failure::Database(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
            Failure::NotFound(m) => (StatusCode::NOT_FOUND, m),
            Failure::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            Failure::Throttled(m) => (StatusCode::TOO_MANY_REQUESTS, m),
            Failure::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
        };
        (status, pages::error_page(status, &message)).into_response()
    }
}
