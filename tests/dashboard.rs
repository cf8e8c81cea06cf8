//! The web dashboard over HTTP: every page answers with the numbers the
//! rows hold, a read-only dashboard refuses every action and changes
//! nothing, actions need a signed-in operator and the dashboard's CSRF
//! token, each action leaves the rows the CLI's would, and hostile ids and
//! payloads come out escaped.

mod common;

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::redirect::Policy;
use serde_json::json;
use sqlx::PgPool;
use syncq::dashboard::{DashboardOptions, router};
use syncq::{NewTask, RateLimit, TaskQueueManager};

const TOKEN: &str = "test-admin-token";

/// Serves the dashboard on a free loopback port; returns its base URL.
async fn serve(db: &PgPool, options: DashboardOptions) -> String {
    serve_at(db, options, "").await
}

/// The same, nested under `prefix` in an app of its own (as a service
/// mounts it).
async fn serve_at(db: &PgPool, options: DashboardOptions, prefix: &str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dashboard = router(db.clone(), options);
    let app = if prefix.is_empty() {
        dashboard
    } else {
        axum::Router::new().nest(prefix, dashboard)
    };
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}{prefix}")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn get(url: &str, auth: bool) -> (StatusCode, String) {
    let mut request = client().get(url);
    if auth {
        request = request.bearer_auth(TOKEN);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.text().await.unwrap())
}

/// The CSRF token the dashboard's own pages carry.
async fn csrf(base: &str) -> String {
    let (_, page) = get(&format!("{base}/login"), true).await;
    let marker = "name=\"csrf\" value=\"";
    let at = page.find(marker).expect("the page carries a CSRF token");
    page[at + marker.len()..]
        .chars()
        .take_while(|c| *c != '"')
        .collect()
}

async fn post(url: &str, auth: bool, form: &[(&str, &str)]) -> reqwest::Response {
    let mut request = client().post(url).form(form);
    if auth {
        request = request.bearer_auth(TOKEN);
    }
    request.send().await.unwrap()
}

/// A cell's text: the first `data-live="key">…<` in `page`.
fn live(page: &str, key: &str) -> String {
    let marker = format!("data-live=\"{key}\">");
    let at = page
        .find(&marker)
        .unwrap_or_else(|| panic!("no {key} on the page"));
    page[at + marker.len()..]
        .chars()
        .take_while(|c| *c != '<')
        .collect()
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn every_page_answers_with_the_numbers_the_rows_hold(db: PgPool) {
    let manager = TaskQueueManager::new(db.clone());
    for i in 0..3 {
        manager
            .enqueue(NewTask::new("alpha", "noop").payload(json!({ "i": i })))
            .await
            .unwrap();
    }
    let one = manager
        .enqueue(NewTask::new("beta", "fail").payload(json!({ "error": "invalid" })))
        .await
        .unwrap();
    manager
        .queue("alpha")
        .set_rate_limit(Some(RateLimit::new(5, Duration::from_secs(1)).unwrap()))
        .await
        .unwrap();
    manager
        .schedule(syncq::Schedule::new(
            "hourly",
            "alpha",
            "noop",
            syncq::Timing::Cron("0 * * * *".into()),
        ))
        .await
        .unwrap();
    let base = serve(&db, DashboardOptions::default()).await;

    let (status, page) = get(&format!("{base}/"), false).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let queued: i64 = common::count(&db, "status = 'queued'").await;
    assert_eq!(live(&page, "queued"), queued.to_string());
    assert_eq!(live(&page, "queued:alpha"), "3");
    assert_eq!(live(&page, "queued:beta"), "1");
    assert!(page.contains("5/1s (0)"), "alpha's rate limit and its use");
    assert!(page.contains("read-only"));
    assert!(page.contains("<svg"), "the throughput chart");

    let (status, page) = get(&format!("{base}/datasets/alpha"), false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(live(&page, "queued"), "3");
    assert!(page.contains("5 per 1s"));
    let (status, page) = get(&format!("{base}/datasets/alpha?kind=nothing"), false).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("No task matches."));

    let (status, page) = get(&format!("{base}/tasks/{one}"), false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(live(&page, "status"), "queued");
    assert!(
        page.contains("&quot;invalid&quot;"),
        "the payload, escaped JSON"
    );

    let (status, page) = get(&format!("{base}/workers"), false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(live(&page, "workers"), "0");
    let (status, page) = get(&format!("{base}/schedules"), false).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("hourly") && page.contains("0 * * * *"));

    assert_eq!(
        get(&format!("{base}/tasks/999999"), false).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&format!("{base}/datasets/nope"), false).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&format!("{base}/tasks/x"), false).await.0,
        StatusCode::NOT_FOUND
    );
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn the_overview_pages_and_filters_its_datasets(db: PgPool) {
    let manager = TaskQueueManager::new(db.clone());
    manager
        .enqueue_many((0..120).map(|i| NewTask::new(format!("ds-{i:03}"), "noop")))
        .await
        .unwrap();
    // Readiness reaches the datasets table at the next claim; the
    // overview also lists datasets whose signals wait.
    let base = serve(&db, DashboardOptions::default()).await;
    let (_, first) = get(&format!("{base}/"), false).await;
    assert!(first.contains("120 dataset(s)"));
    assert!(first.contains("page 1 of 3"));
    assert!(
        first.contains("data-dataset=\"ds-000\"") && !first.contains("data-dataset=\"ds-050\"")
    );
    let (_, third) = get(&format!("{base}/?page=2"), false).await;
    assert!(
        third.contains("data-dataset=\"ds-119\"") && !third.contains("data-dataset=\"ds-000\"")
    );
    let (_, some) = get(&format!("{base}/?q=DS-11"), false).await;
    assert!(
        some.contains("10 dataset(s)"),
        "ds-110 … ds-119, case-insensitive"
    );
    let (_, sorted) = get(&format!("{base}/?sort=queued"), false).await;
    assert!(sorted.contains("page 1 of 3"));
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_read_only_dashboard_refuses_every_action_and_changes_nothing(db: PgPool) {
    let manager = TaskQueueManager::new(db.clone());
    let id = manager
        .enqueue(NewTask::new("alpha", "noop"))
        .await
        .unwrap();
    let base = serve(&db, DashboardOptions::default()).await;
    // A read-only dashboard's pages carry no CSRF token: no form to post.
    let (_, page) = get(&format!("{base}/login"), true).await;
    assert!(!page.contains("name=\"csrf\""));
    let csrf = "0123456789abcdef".to_string();
    for path in [
        "/datasets/alpha/pause",
        "/datasets/alpha/limits",
        "/datasets/alpha/cancel",
        "/datasets/alpha/retry",
        &format!("/tasks/{id}/cancel"),
        &format!("/tasks/{id}/retry"),
    ] {
        let answer = post(
            &format!("{base}{path}"),
            true,
            &[("csrf", &csrf), ("concurrency", "3")],
        )
        .await;
        assert_eq!(answer.status(), StatusCode::FORBIDDEN, "{path}");
    }
    assert!(!common::paused(&db, "alpha").await);
    assert_eq!(common::status(&db, id).await, "queued");
    let cancel_requested: bool =
        sqlx::query_scalar("SELECT cancel_requested FROM syncq.tasks WHERE id = $1")
            .bind(i64::from(id))
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(!cancel_requested);
    let (_, page) = get(&format!("{base}/datasets/alpha"), true).await;
    assert!(
        !page.contains("/datasets/alpha/pause\""),
        "no action is offered"
    );
}

/// A browser's sign-in: loads the form (its cookie and CSRF token), posts
/// `token`. The answer, and the form's cookie.
async fn sign_in(base: &str, token: &str) -> reqwest::Response {
    let form = client().get(format!("{base}/login")).send().await.unwrap();
    let cookie = cookie_of(&form, "syncq_login").expect("the sign-in form sets a cookie");
    let page = form.text().await.unwrap();
    let csrf = field(&page, "csrf").expect("the sign-in form carries a CSRF token");
    client()
        .post(format!("{base}/login"))
        .header("cookie", cookie)
        .form(&[("csrf", csrf.as_str()), ("token", token)])
        .send()
        .await
        .unwrap()
}

/// `name=value` of the cookie `name` an answer sets.
fn cookie_of(answer: &reqwest::Response, name: &str) -> Option<String> {
    answer
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with(&format!("{name}=")))
        .map(|c| c.split(';').next().unwrap_or_default().to_string())
}

/// The value of the first hidden input `name` on `page`.
fn field(page: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let at = page.find(&marker)?;
    Some(
        page[at + marker.len()..]
            .chars()
            .take_while(|c| *c != '"')
            .collect(),
    )
}

async fn get_with_cookie(url: &str, cookie: &str) -> (StatusCode, String) {
    let answer = client()
        .get(url)
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    let status = answer.status();
    (status, answer.text().await.unwrap())
}

async fn post_with_cookie(url: &str, cookie: &str, form: &[(&str, &str)]) -> StatusCode {
    client()
        .post(url)
        .header("cookie", cookie)
        .form(form)
        .send()
        .await
        .unwrap()
        .status()
}

/// Sessions as a security reviewer expects (issue 25): the cookie is a
/// session derived from the token, not the token; each session has its
/// own CSRF token, which no anonymous page shows; signing out revokes the
/// cookie; the bearer token needs no CSRF token (a browser never sends it
/// on its own).
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn actions_need_a_signed_in_operator_and_the_csrf_token(db: PgPool) {
    let manager = TaskQueueManager::new(db.clone());
    manager
        .enqueue(NewTask::new("alpha", "noop"))
        .await
        .unwrap();
    let base = serve(&db, DashboardOptions::default().token(TOKEN)).await;
    let url = format!("{base}/datasets/alpha/pause");

    // Anonymous: no page holds a token to act with, and nothing is allowed.
    let (_, page) = get(&format!("{base}/datasets/alpha"), false).await;
    assert!(
        field(&page, "csrf").is_none(),
        "an anonymous page shows a CSRF token"
    );
    assert_eq!(post(&url, false, &[]).await.status(), StatusCode::FORBIDDEN);

    // A wrong token signs nobody in; a form from elsewhere (no cookie of
    // its own) neither, even with the right token.
    let wrong = sign_in(&base, "not-the-admin-token").await;
    assert!(cookie_of(&wrong, "syncq_session").is_none());
    let (_, login) = get(&format!("{base}/login"), false).await;
    let forged = client()
        .post(format!("{base}/login"))
        .form(&[
            ("csrf", field(&login, "csrf").unwrap().as_str()),
            ("token", TOKEN),
        ])
        .send()
        .await
        .unwrap();
    assert!(
        cookie_of(&forged, "syncq_session").is_none(),
        "signed in without the form's cookie"
    );

    let signed = sign_in(&base, TOKEN).await;
    assert_eq!(signed.status(), StatusCode::SEE_OTHER);
    let set = signed
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("syncq_session="))
        .unwrap()
        .to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let session = cookie_of(&signed, "syncq_session").unwrap();
    assert!(
        !session.contains(TOKEN),
        "the cookie holds the token: {session}"
    );

    // The session's pages carry its CSRF token; without it, or with
    // another session's, nothing is done.
    let (_, page) = get_with_cookie(&format!("{base}/datasets/alpha"), &session).await;
    let csrf = field(&page, "csrf").expect("a signed-in page carries the session's CSRF token");
    let other = cookie_of(&sign_in(&base, TOKEN).await, "syncq_session").unwrap();
    let (_, other_page) = get_with_cookie(&format!("{base}/"), &other).await;
    let other_csrf = field(&other_page, "csrf").unwrap();
    assert_ne!(csrf, other_csrf, "two sessions share a CSRF token");
    assert_eq!(
        post_with_cookie(&url, &session, &[]).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post_with_cookie(&url, &session, &[("csrf", &other_csrf)]).await,
        StatusCode::FORBIDDEN
    );
    assert!(!common::paused(&db, "alpha").await);
    assert_eq!(
        post_with_cookie(&url, &session, &[("csrf", &csrf)]).await,
        StatusCode::SEE_OTHER
    );
    assert!(common::paused(&db, "alpha").await);

    // Signing out revokes the cookie: sent again, it is nobody's.
    assert_eq!(
        post_with_cookie(&format!("{base}/logout"), &session, &[("csrf", &csrf)]).await,
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        post_with_cookie(
            &format!("{base}/datasets/alpha/resume"),
            &session,
            &[("csrf", &csrf)]
        )
        .await,
        StatusCode::FORBIDDEN
    );
    assert!(common::paused(&db, "alpha").await);

    // The bearer token acts without a CSRF token.
    let resumed = post(&format!("{base}/datasets/alpha/resume"), true, &[]).await;
    assert_eq!(resumed.status(), StatusCode::SEE_OTHER);
    assert!(!common::paused(&db, "alpha").await);
}

/// Guessing the token is throttled: after 10 wrong sign-ins in a minute,
/// sign-in is refused (429) — the right token too, by form or bearer —
/// while a session signed in before keeps working. Before, 300 guesses
/// went through in 3 s.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn guessing_the_token_is_throttled(db: PgPool) {
    let base = serve(&db, DashboardOptions::default().token(TOKEN)).await;
    let session = cookie_of(&sign_in(&base, TOKEN).await, "syncq_session").unwrap();
    for i in 0..10 {
        let guess = sign_in(&base, &format!("guess-number-{i:04}")).await;
        assert_eq!(guess.status(), StatusCode::SEE_OTHER, "guess {i}");
        assert!(cookie_of(&guess, "syncq_session").is_none());
    }
    let refused = sign_in(&base, TOKEN).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(cookie_of(&refused, "syncq_session").is_none());
    let (status, page) = get(&format!("{base}/"), true).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !page.contains("Sign out"),
        "the bearer token was checked while throttled"
    );
    let (_, page) = get_with_cookie(&format!("{base}/"), &session).await;
    assert!(
        page.contains("Sign out"),
        "an earlier session stopped working"
    );
}

/// Any token of 16 bytes or more signs in, whatever its characters (one
/// with `;` or non-ASCII could not, and `;` injected cookie attributes); a
/// shorter one leaves the dashboard read-only.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn any_long_token_signs_in_and_a_short_one_is_refused(db: PgPool) {
    let odd = "päss; Path=/evil; wörd=✓ 123";
    let base = serve(&db, DashboardOptions::default().token(odd)).await;
    let signed = sign_in(&base, odd).await;
    let session = cookie_of(&signed, "syncq_session").expect("the odd token signs in");
    let set: Vec<String> = signed
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(String::from))
        .collect();
    assert!(set.iter().all(|c| !c.contains("/evil")), "{set:?}");
    let (_, page) = get_with_cookie(&format!("{base}/"), &session).await;
    assert!(page.contains("Sign out"));

    assert!(DashboardOptions::default().token("short").check().is_err());
    let base = serve(&db, DashboardOptions::default().token("short")).await;
    let (_, page) = get(&format!("{base}/login"), false).await;
    assert!(page.contains("read-only"), "a 5-byte token was accepted");
    assert!(field(&page, "csrf").is_none());
}

/// The flash message after an action is one of the dashboard's own texts,
/// named by a code: a link cannot make a page say anything else.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn flash_messages_are_the_dashboards_own_words(db: PgPool) {
    let manager = TaskQueueManager::new(db.clone());
    manager
        .enqueue(NewTask::new("alpha", "noop"))
        .await
        .unwrap();
    let base = serve(&db, DashboardOptions::default().token(TOKEN)).await;
    let (_, page) = get(
        &format!("{base}/?done=Your+session+expired%2C+call+555-0100"),
        false,
    )
    .await;
    assert!(!page.contains("555-0100"), "the URL's text was shown");
    let (_, page) = get(&format!("{base}/datasets/alpha?done=retried&n=3"), false).await;
    assert!(page.contains("3 task(s) queued again."));
    let (_, page) = get(&format!("{base}/datasets/alpha?done=retried&n=lots"), false).await;
    assert!(page.contains("0 task(s) queued again.") && !page.contains("lots"));
    let paused = post(&format!("{base}/datasets/alpha/pause"), true, &[]).await;
    let to = paused
        .headers()
        .get("location")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(to.ends_with("/datasets/alpha?done=paused"), "{to}");
}

/// Actions configure only datasets that exist, as the CLI without
/// `--create`: an unknown one is a 404, and no row is made.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn actions_on_an_unknown_dataset_make_no_row(db: PgPool) {
    let base = serve(&db, DashboardOptions::default().token(TOKEN)).await;
    for (path, form) in [
        ("pause", vec![]),
        ("resume", vec![]),
        ("limits", vec![("concurrency", "3")]),
        ("retry", vec![]),
        ("cancel", vec![]),
    ] {
        let answer = post(&format!("{base}/datasets/ghost/{path}"), true, &form).await;
        assert_eq!(answer.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM syncq.datasets")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(rows, 0, "an action created a dataset row");
}

/// The dashboard queries through a pool of its own: a service whose pool
/// is exhausted (its workers' claims hold every connection) still shows
/// its dashboard, and the dashboard's queries cannot take those
/// connections either.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn the_dashboard_has_a_pool_of_its_own(
    _: sqlx::postgres::PgPoolOptions,
    opts: sqlx::postgres::PgConnectOptions,
) {
    let service = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(1))
        .connect_with(opts.clone())
        .await
        .unwrap();
    TaskQueueManager::new(service.clone())
        .enqueue(NewTask::new("alpha", "noop"))
        .await
        .unwrap();
    let base = serve(&service, DashboardOptions::default()).await;
    let mut held = service.acquire().await.unwrap();
    let (status, page) = get(&format!("{base}/datasets/alpha"), false).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let timeout: String =
        sqlx::query_scalar("SELECT setting FROM pg_settings WHERE name = 'statement_timeout'")
            .fetch_one(&mut *held)
            .await
            .unwrap();
    assert_eq!(timeout, "0", "the service's own connections were changed");
    // The service's pool has one connection, held here: the page was read
    // on another.
    let others: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
    )
    .fetch_one(&mut *held)
    .await
    .unwrap();
    assert!(others >= 1, "the dashboard opened no connection of its own");
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn each_action_leaves_the_rows_the_cli_would(db: PgPool) {
    let manager = TaskQueueManager::new(db.clone());
    let queued = manager
        .enqueue(NewTask::new("alpha", "noop"))
        .await
        .unwrap();
    let failed: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO syncq.tasks (dataset_id, kind, status, attempts, finished_at, last_error)
         VALUES ('alpha', 'fetch', 'failed', 1, now(), 'upstream 404'),
                ('alpha', 'fetch', 'failed', 1, now(), 'upstream 500'),
                ('alpha', 'other', 'failed', 1, now(), 'upstream 404')
         RETURNING id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let base = serve_at(&db, DashboardOptions::default().token(TOKEN), "/ops/syncq").await;
    let csrf = csrf(&base).await;
    let act = |path: String, form: Vec<(&'static str, String)>| {
        let csrf = csrf.clone();
        async move {
            let mut form = form;
            form.push(("csrf", csrf));
            let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let answer = post(&path, true, &form).await;
            assert_eq!(answer.status(), StatusCode::SEE_OTHER, "{path}");
            let to = answer
                .headers()
                .get("location")
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            assert!(
                to.starts_with("/ops/syncq/"),
                "redirected within the mount: {to}"
            );
        }
    };

    act(
        format!("{base}/datasets/alpha/limits"),
        vec![
            ("rate", "7/2s".into()),
            ("concurrency", "3".into()),
            ("weight", "5".into()),
        ],
    )
    .await;
    let (rate, window, cap, weight): (Option<i32>, f64, Option<i32>, i32) = sqlx::query_as(
        "SELECT rate_limit, extract(epoch FROM rate_window)::float8, max_concurrency, weight
         FROM syncq.datasets WHERE dataset_id = 'alpha'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!((rate, window, cap, weight), (Some(7), 2.0, Some(3), 5));
    act(
        format!("{base}/datasets/alpha/limits"),
        vec![("rate", "none".into())],
    )
    .await;
    let (rate, cap): (Option<i32>, Option<i32>) = sqlx::query_as(
        "SELECT rate_limit, max_concurrency FROM syncq.datasets WHERE dataset_id = 'alpha'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!((rate, cap), (None, Some(3)), "only what is named changes");

    // Retry the failed tasks of kind "fetch" whose error says 404.
    act(
        format!("{base}/datasets/alpha/retry"),
        vec![
            ("status", "failed".into()),
            ("kind", "fetch".into()),
            ("error", "404".into()),
        ],
    )
    .await;
    assert_eq!(common::status(&db, failed[0]).await, "queued");
    assert_eq!(common::status(&db, failed[1]).await, "failed");
    assert_eq!(common::status(&db, failed[2]).await, "failed");

    act(format!("{base}/tasks/{queued}/cancel"), vec![]).await;
    assert_eq!(common::status(&db, queued).await, "cancelled");
    act(format!("{base}/tasks/{queued}/retry"), vec![]).await;
    assert_eq!(common::status(&db, queued).await, "queued");

    act(format!("{base}/datasets/alpha/pause"), vec![]).await;
    assert!(common::paused(&db, "alpha").await);
    act(format!("{base}/datasets/alpha/resume"), vec![]).await;
    assert!(!common::paused(&db, "alpha").await);

    // Adaptive on; a throttle shown with its end, and lifted.
    act(
        format!("{base}/datasets/alpha/limits"),
        vec![("rate", "10/1s".into()), ("adaptive", "on".into())],
    )
    .await;
    sqlx::query(
        "UPDATE syncq.datasets SET throttled_until = now() + interval '1 hour',
                adapted_from = 4, adapted_at = now() WHERE dataset_id = 'alpha'",
    )
    .execute(&db)
    .await
    .unwrap();
    let (_, page) = get(&format!("{base}/datasets/alpha"), true).await;
    assert!(page.contains("(upstream)"), "the throttle is shown");
    assert!(
        page.contains("adaptive, now 3.00"),
        "the learned rate is shown"
    );
    act(format!("{base}/datasets/alpha/unthrottle"), vec![]).await;
    let (until, adaptive, from): (Option<chrono::DateTime<chrono::Utc>>, bool, Option<f64>) =
        sqlx::query_as(
            "SELECT throttled_until, adaptive, adapted_from FROM syncq.datasets WHERE dataset_id = 'alpha'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!((until, adaptive, from), (None, true, None));
    act(
        format!("{base}/datasets/alpha/limits"),
        vec![("adaptive", "off".into())],
    )
    .await;

    act(
        format!("{base}/datasets/alpha/cancel"),
        vec![("kind", "noop".into())],
    )
    .await;
    assert_eq!(common::status(&db, queued).await, "cancelled");
    assert_eq!(
        common::status(&db, failed[0]).await,
        "queued",
        "another kind: untouched"
    );

    let bad = post(
        &format!("{base}/datasets/alpha/limits"),
        true,
        &[("csrf", &csrf), ("concurrency", "0")],
    )
    .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert!(bad.text().await.unwrap().contains("max_concurrency"));
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn hostile_ids_and_payloads_come_out_escaped(db: PgPool) {
    let manager = TaskQueueManager::new(db.clone());
    let evil = "<script>alert('id')</script>";
    let id = manager
        .enqueue(
            NewTask::new(evil, "noop")
                .payload(json!({ "html": "</pre><script>alert('payload')</script>" })),
        )
        .await
        .unwrap();
    sqlx::query("UPDATE syncq.tasks SET last_error = '<img src=x onerror=alert(1)>' WHERE id = $1")
        .bind(i64::from(id))
        .execute(&db)
        .await
        .unwrap();
    let base = serve(&db, DashboardOptions::default().token(TOKEN)).await;
    for path in [
        "/".to_string(),
        format!("/tasks/{id}"),
        "/datasets/%3Cscript%3Ealert('id')%3C%2Fscript%3E".to_string(),
    ] {
        let (status, page) = get(&format!("{base}{path}"), true).await;
        assert_eq!(status, StatusCode::OK, "{path}: {page}");
        assert!(
            !page.contains("<script>alert"),
            "{path}: raw script in the page"
        );
        assert!(
            !page.contains("<img src=x"),
            "{path}: raw markup in the page"
        );
        assert!(
            page.contains("&lt;script&gt;alert("),
            "{path}: the text is shown, escaped"
        );
    }
}

/// `syncq dashboard` as a process: the line it prints, and what it says
/// when asked to listen beyond loopback without a token.
async fn start_command(
    url: &str,
    addr: &str,
    token: Option<&str>,
) -> (tokio::process::Child, String, String) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncq"));
    command
        .env("DATABASE_URL", url)
        .env_remove("SYNCQ_DASHBOARD_TOKEN")
        .args(["dashboard", "--addr", addr])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(token) = token {
        command.env("SYNCQ_DASHBOARD_TOKEN", token);
    }
    let mut child = command.spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .expect("the dashboard says where it listens")
        .unwrap()
        .unwrap_or_default();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut notes = String::new();
    while let Ok(Ok(Some(l))) =
        tokio::time::timeout(Duration::from_millis(300), stderr.next_line()).await
    {
        notes.push_str(&l);
        notes.push('\n');
    }
    (child, line, notes)
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn the_dashboard_command_serves_on_loopback_and_warns_when_asked_wider(
    _: sqlx::postgres::PgPoolOptions,
    opts: sqlx::postgres::PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    TaskQueueManager::new(db.clone())
        .enqueue(NewTask::new("alpha", "noop"))
        .await
        .unwrap();
    let url = common::url(&opts);
    let (_child, line, notes) = start_command(&url, "127.0.0.1:0", None).await;
    assert!(line.contains("read-only"), "{line}");
    assert!(!notes.contains("beyond loopback"), "{notes}");
    let address = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("a URL")
        .trim_end_matches('/')
        .to_string();
    let (status, page) = get(&format!("{address}/"), false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(live(&page, "queued:alpha"), "1");

    let (_wide, line, notes) = start_command(&url, "0.0.0.0:0", None).await;
    assert!(line.contains("read-only"), "{line}");
    assert!(
        notes.contains("beyond loopback without SYNCQ_DASHBOARD_TOKEN"),
        "{notes}"
    );
    let (_admin, line, _) = start_command(&url, "127.0.0.1:0", Some(TOKEN)).await;
    assert!(line.contains("actions allowed"), "{line}");

    // A guessable token is refused in one line, exit 2.
    let short = std::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", &url)
        .env("SYNCQ_DASHBOARD_TOKEN", "s3cret")
        .args(["dashboard", "--addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&short.stderr);
    assert_eq!(short.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("at least 16") && stderr.lines().count() == 1,
        "{stderr}"
    );
}

/// A dashboard told its names answers only them (a page whose DNS name is
/// rebound to the dashboard's address sends its own name as `Host`: 400),
/// and every answer carries a content security policy that names the
/// page's own style and script by hash and forbids framing, with nosniff.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn it_answers_only_its_own_names_with_security_headers(db: PgPool) {
    let base = serve(&db, DashboardOptions::default().hosts(["127.0.0.1"])).await;
    let (status, _) = get(&base, false).await;
    assert_eq!(status, StatusCode::OK);
    let rebound = client()
        .get(&base)
        .header("Host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), StatusCode::BAD_REQUEST);
    let body = rebound.text().await.unwrap();
    assert!(!body.contains("syncq.tasks"), "{body}");

    let response = client().get(&base).send().await.unwrap();
    let headers = response.headers().clone();
    let csp = headers["content-security-policy"].to_str().unwrap();
    for part in [
        "default-src 'none'",
        "script-src 'sha256-",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
}

/// The dataset page lists tasks without reading their payloads: a task of
/// 5 MB is listed, and neither its payload nor anything of it is on the
/// page (the task's own page shows it).
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn the_dataset_page_reads_no_payload(db: PgPool) {
    let big = "p".repeat(5_000_000);
    let id = TaskQueueManager::new(db.clone())
        .enqueue(NewTask::new("big", "noop").payload(json!({ "blob": big })))
        .await
        .unwrap();
    let listed = TaskQueueManager::new(db.clone())
        .tasks(&syncq::inspect::TaskFilter {
            dataset_id: Some("big".into()),
            without_values: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].payload, serde_json::Value::Null);
    let base = serve(&db, DashboardOptions::default()).await;
    let (status, page) = get(&format!("{base}/datasets/big"), false).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(&id.to_string()));
    assert!(page.len() < 1_000_000, "a page of {} bytes", page.len());
    let (status, task_page) = get(&format!("{base}/tasks/{id}"), false).await;
    assert_eq!(status, StatusCode::OK);
    assert!(task_page.len() > 5_000_000);
}

/// A NUL in a URL (which no text column can hold) is the visitor's bad
/// input: 400, with none of the database's words on the page.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_nul_in_a_url_is_a_bad_request_without_the_databases_words(db: PgPool) {
    TaskQueueManager::new(db.clone())
        .enqueue(NewTask::new("d", "noop"))
        .await
        .unwrap();
    let base = serve(&db, DashboardOptions::default()).await;
    for path in ["/datasets/a%00b", "/datasets/d?error=a%00b"] {
        let (status, page) = get(&format!("{base}{path}"), false).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {page}");
        assert!(
            !page.contains("0x00") && !page.contains("UTF8"),
            "{path}: {page}"
        );
    }
}

/// A task's page shows its errors a page at a time, newest first: one that
/// kept answering "rate limited" had 300,000 rows and a 40 MB page
/// refetched every 2 s.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_task_page_pages_its_errors(db: PgPool) {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO syncq.tasks (dataset_id, kind) VALUES ('alpha', 'noop') RETURNING id",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO syncq.task_errors (task_id, attempt, error)
         SELECT $1, 1, 'rate limited #' || i FROM generate_series(1, 3000) i",
    )
    .bind(id)
    .execute(&db)
    .await
    .unwrap();
    let base = serve(&db, DashboardOptions::default()).await;
    let (status, page) = get(&format!("{base}/tasks/{id}"), false).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("3000 in all"), "no total");
    assert!(
        page.contains("rate limited #3000<"),
        "the newest is not first"
    );
    assert!(
        !page.contains("rate limited #2950<"),
        "more than a page shown"
    );
    assert!(page.len() < 100_000, "a page of {} bytes", page.len());
    assert!(page.contains("?errors=1"), "no link to older errors");
    let (_, older) = get(&format!("{base}/tasks/{id}?errors=1"), false).await;
    assert!(older.contains("rate limited #2950<") && !older.contains("rate limited #3000<"));
}

/// Shared limits on the dashboard (issue 26): the overview lists each with
/// its windows' use and its datasets; an operator sets the limits a
/// dataset uses from its page; an unknown name is a 400 naming the column.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn shared_limits_are_shown_and_set(db: PgPool) {
    let manager = TaskQueueManager::new(db.clone());
    manager
        .enqueue(NewTask::new("alpha", "noop"))
        .await
        .unwrap();
    manager
        .set_limit(
            "token",
            &[
                RateLimit::new(20, Duration::from_secs(1)).unwrap(),
                RateLimit::new(100, Duration::from_secs(10)).unwrap(),
            ],
        )
        .await
        .unwrap();
    let base = serve(&db, DashboardOptions::default().token(TOKEN)).await;
    let url = format!("{base}/datasets/alpha/limits");
    let set = post(&url, true, &[("uses", "token")]).await;
    assert_eq!(set.status(), StatusCode::SEE_OTHER);
    let uses: Vec<String> =
        sqlx::query_scalar("SELECT shared_limits FROM syncq.datasets WHERE dataset_id = 'alpha'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(uses, vec!["token".to_string()]);
    let unknown = post(&url, true, &[("uses", "token,nope")]).await;
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    assert!(unknown.text().await.unwrap().contains("shared_limits"));
    let (_, page) = get(&format!("{base}/"), false).await;
    assert!(page.contains("Shared limits"), "no limits section");
    assert_eq!(live(&page, "limit:token"), "0 / 20 per 1s, 0 / 100 per 10s");
    assert!(page.contains("/datasets/alpha\">alpha</a>"));
}
