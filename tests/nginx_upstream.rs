//! A real rate-limited upstream (issue 26): nginx's `limit_req` (Debian's
//! `nginx`; `.ci/run` installs it when missing) serving paged JSON to
//! `examples/http_sync.rs`, for four datasets that share one API token's
//! limit, drained by three worker pools. nginx's own access log is the
//! upstream's count: zero 429s, every page fetched exactly once.
//!
//! nginx's `limit_req` with `burst=0` is a leaky bucket: it refuses any
//! request closer than 1/rate to the one before (at 10 r/s, 100 ms). A
//! sliding window of 10/1s alone would send bursts it refuses, so the
//! token's limit has two windows — 10/1s, and one request per 120 ms (the
//! margin covers the milliseconds between syncq's grant and nginx seeing
//! the request).

mod common;

#[allow(dead_code)]
#[path = "../examples/http_sync.rs"]
mod http_sync;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use syncq::{NewTask, PoolConfig, RateLimit, TaskQueueManager, WorkerPool};

const PAGES: u64 = 5;

/// The tests here run one at a time: each counts nginx's refusals, and the
/// other's worker processes beside it delay requests by more than the
/// margins a limit leaves (a 429 under CI once, with both running).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const RESOURCES: [&str; 4] = ["issues", "comments", "labels", "commits"];

/// nginx on a free loopback port, serving `{dir}/data/{resource}/{cursor}.json`
/// at `/resources/{resource}?cursor=N` under `limit_req` 10 r/s, burst 0.
struct Nginx {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker processes (a SIGKILL of the
        // master alone leaves them running, listening).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn start_nginx(dir: &Path) -> Nginx {
    start_nginx_with(dir, 10, &RESOURCES, PAGES)
}

/// nginx serving `pages` pages of each of `resources` at `rate` r/s.
fn start_nginx_with(dir: &Path, rate: u32, resources: &[&str], pages_each: u64) -> Nginx {
    common::apt_install_if_root(&["nginx"]);
    let binary = nginx_binary().expect("nginx is installed (apt-get install nginx; .ci/run does)");
    for resource in resources {
        let pages = dir.join("data").join(resource);
        std::fs::create_dir_all(&pages).unwrap();
        for cursor in 0..pages_each {
            let next = if cursor + 1 < pages_each {
                json!(cursor + 1)
            } else {
                json!(null)
            };
            let items: Vec<_> = (0..10).map(|i| json!({ "id": cursor * 10 + i })).collect();
            std::fs::write(
                pages.join(format!("{cursor}.json")),
                json!({ "items": items, "next": next }).to_string(),
            )
            .unwrap();
        }
    }
    // Readable by nginx's workers (they drop root).
    let _ = Command::new("chmod").args(["-R", "a+rX"]).arg(dir).status();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    write_conf(dir, port, rate);
    let child = Command::new(&binary)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nginx");
    Nginx {
        child,
        dir: dir.to_path_buf(),
        port,
    }
}

/// Its configuration: `limit_req` at `rate` r/s, burst 0, 429 when
/// refused (without Retry-After, as nginx answers). The access log has
/// each request's time.
fn write_conf(dir: &Path, port: u16, rate: u32) {
    let conf = format!(
        "worker_processes 1;
         pid {dir}/nginx.pid;
         error_log {dir}/error.log warn;
         events {{ worker_connections 256; }}
         http {{
             access_log off;
             client_body_temp_path {dir}/body;
             proxy_temp_path {dir}/proxy;
             fastcgi_temp_path {dir}/fastcgi;
             uwsgi_temp_path {dir}/uwsgi;
             scgi_temp_path {dir}/scgi;
             limit_req_zone $server_name zone=api:1m rate={rate}r/s;
             log_format upstream '$status $uri $arg_cursor $msec';
             server {{
                 listen 127.0.0.1:{port};
                 server_name upstream;
                 location /resources/ {{
                     limit_req zone=api;
                     limit_req_status 429;
                     access_log {dir}/access.log upstream;
                     default_type application/json;
                     root {dir}/data;
                     rewrite ^/resources/(.*)$ /$1/$arg_cursor.json break;
                 }}
             }}
         }}",
        dir = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
}

impl Nginx {
    /// Changes the upstream's rate in place: `nginx -s reload`.
    fn set_rate(&self, rate: u32) {
        write_conf(&self.dir, self.port, rate);
        let binary = nginx_binary().expect("nginx is installed");
        let status = Command::new(binary)
            .arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg(self.dir.join("nginx.conf"))
            .args(["-s", "reload"])
            .status()
            .expect("nginx -s reload");
        assert!(status.success(), "nginx -s reload: {status}");
    }
}

/// `(status, resource, cursor)` of every request nginx logged.
fn requests(dir: &Path) -> Vec<(u16, String, u64)> {
    timed_requests(dir)
        .into_iter()
        .map(|(status, resource, cursor, _)| (status, resource, cursor))
        .collect()
}

/// `(status, resource, cursor, at)` of every request nginx logged, `at` in
/// seconds since the epoch, to the millisecond.
fn timed_requests(dir: &Path) -> Vec<(u16, String, u64, f64)> {
    std::fs::read_to_string(dir.join("access.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let status = parts.next()?.parse().ok()?;
            let uri = parts.next()?;
            let resource = uri.rsplit('/').nth(1)?.to_string();
            let cursor = parts.next()?.parse().ok()?;
            let at = parts.next()?.parse().ok()?;
            Some((status, resource, cursor, at))
        })
        .collect()
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn nginx_limit_req_answers_no_429_to_four_datasets_sharing_a_token(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let _turn = SERIAL.lock().await;
    let dir = std::env::temp_dir().join(format!("syncq-nginx-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let nginx = start_nginx(&dir);
    let base = format!("http://127.0.0.1:{}", nginx.port);
    common::wait_for("nginx answers", Duration::from_secs(30), || {
        let base = base.clone();
        async move { reqwest::get(format!("{base}/health")).await.is_ok() }
    })
    .await;

    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    manager
        .set_limit(
            "api-token",
            &[
                RateLimit::new(10, Duration::from_secs(1)).unwrap(),
                RateLimit::new(1, Duration::from_millis(120)).unwrap(),
            ],
        )
        .await
        .unwrap();
    let mut ids = HashMap::new();
    for (i, resource) in RESOURCES.iter().enumerate() {
        let dataset = format!("repo-{i}");
        manager
            .queue(&dataset)
            .use_limits(&["api-token".to_string()])
            .await
            .unwrap();
        let id = manager
            .enqueue(NewTask::new(&dataset, "http_sync").payload(json!({ "resource": resource })))
            .await
            .unwrap();
        ids.insert(*resource, id);
    }
    // Three pools, as three hosts.
    let mut running = Vec::new();
    for _ in 0..3 {
        let pool = WorkerPool::builder(db.clone())
            .register("http_sync", http_sync::HttpSync::new(base.clone()).unwrap())
            .config(PoolConfig {
                concurrency: 4,
                ..common::fast_config()
            })
            .build()
            .unwrap();
        running.push(common::spawn(pool));
    }
    common::wait_for("every sync finished", Duration::from_secs(90), || {
        let db = db.clone();
        async move { common::count(&db, "status IN ('queued', 'running')").await == 0 }
    })
    .await;
    for (handle, run) in running {
        handle.checkpoint();
        run.await.unwrap().unwrap();
    }
    let log = requests(&dir);
    let refused = log.iter().filter(|(status, _, _)| *status == 429).count();
    assert_eq!(refused, 0, "nginx refused {refused} requests: {log:?}");
    for resource in RESOURCES {
        for cursor in 0..PAGES {
            let served = log
                .iter()
                .filter(|(s, r, c)| *s == 200 && r == resource && *c == cursor)
                .count();
            assert_eq!(
                served, 1,
                "{resource} page {cursor} fetched {served} times: {log:?}"
            );
        }
        let row = common::task(&db, ids[resource]).await;
        assert_eq!(row.status, "succeeded", "{resource}");
    }
    eprintln!("nginx served {} requests, 0 refused", log.len());
    drop(nginx);
}

/// Not a test of its own: the worker processes of the adaptive test (this
/// binary run again with `NGINX_WORKER_URL` and `NGINX_WORKER_API` set),
/// each a pool of three slots syncing with `examples/http_sync.rs`.
/// Without them, it returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the adaptive nginx test as a worker process"]
async fn nginx_worker_process() {
    let (Ok(url), Ok(api)) = (
        std::env::var("NGINX_WORKER_URL"),
        std::env::var("NGINX_WORKER_API"),
    ) else {
        return;
    };
    let db = PgPoolOptions::new()
        .max_connections(6)
        .connect(&url)
        .await
        .expect("connect");
    WorkerPool::builder(db)
        .register(
            "http_sync",
            http_sync::HttpSync::new(api).expect("a client"),
        )
        .config(PoolConfig {
            concurrency: 3,
            ..PoolConfig::default()
        })
        .build()
        .expect("build the pool")
        .run_with_signals()
        .await
        .expect("the pool ran");
}

struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Requests per second and 429s in `[from, to)` (seconds since the epoch).
fn rate_in(log: &[(u16, String, u64, f64)], from: f64, to: f64) -> (f64, usize, usize) {
    let inside: Vec<_> = log.iter().filter(|r| r.3 >= from && r.3 < to).collect();
    let refused = inside.iter().filter(|r| r.0 == 429).count();
    (inside.len() as f64 / (to - from), inside.len(), refused)
}

fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// SPEC §6, issue 27: an adaptive shared limit of 10/1s in front of an
/// upstream (nginx `limit_req`, burst 0, no Retry-After) that serves only
/// 3 r/s, synced by three worker processes: the fleet learns the rate,
/// then climbs back when the upstream is raised to 10 r/s — every page
/// served once.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn an_adaptive_limit_learns_the_upstreams_rate_and_climbs_back(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let _turn = SERIAL.lock().await;
    const RESOURCES: [&str; 8] = ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"];
    const PAGES: u64 = 85;
    let dir = std::env::temp_dir().join(format!("syncq-nginx-adaptive-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let nginx = start_nginx_with(&dir, 3, &RESOURCES, PAGES);
    let base = format!("http://127.0.0.1:{}", nginx.port);
    common::wait_for("nginx answers", Duration::from_secs(30), || {
        let base = base.clone();
        async move { reqwest::get(format!("{base}/health")).await.is_ok() }
    })
    .await;

    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    manager
        .set_limit(
            "api-token",
            &[RateLimit::new(10, Duration::from_secs(1)).unwrap()],
        )
        .await
        .unwrap();
    assert!(manager.set_limit_adaptive("api-token", true).await.unwrap());
    for (i, resource) in RESOURCES.iter().enumerate() {
        let dataset = format!("repo-{}", i % 2);
        manager
            .queue(&dataset)
            .use_limits(&["api-token".to_string()])
            .await
            .unwrap();
        manager
            .enqueue(NewTask::new(&dataset, "http_sync").payload(json!({ "resource": resource })))
            .await
            .unwrap();
    }
    let exe = std::env::current_exe().expect("the test binary");
    let started = epoch_now();
    let _workers = Processes(
        (0..3)
            .map(|_| {
                Command::new(&exe)
                    .args([
                        "nginx_worker_process",
                        "--exact",
                        "--ignored",
                        "--nocapture",
                    ])
                    .env("NGINX_WORKER_URL", common::url(&opts))
                    .env("NGINX_WORKER_API", &base)
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start a worker process")
            })
            .collect(),
    );
    // The effective rate, sampled each second (for the record).
    let effective = || {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, Option<f64>>(
                "SELECT max(effective_rate) FROM syncq.limit_stats WHERE limit_id = 'api-token'",
            )
            .fetch_one(&db)
            .await
            .unwrap()
            .unwrap_or(0.0)
        }
    };
    let mut samples = Vec::new();
    // The upstream at 3 r/s: 30 s to settle, then 20 s measured.
    while epoch_now() < started + 50.0 {
        samples.push((epoch_now() - started, effective().await));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    nginx.set_rate(10);
    let raised = epoch_now();
    common::wait_for("every sync finished", Duration::from_secs(150), || {
        let db = db.clone();
        async move { common::count(&db, "status IN ('queued', 'running')").await == 0 }
    })
    .await;
    let finished = epoch_now();
    samples.push((finished - started, effective().await));

    let log = timed_requests(&dir);
    eprintln!("upstream  window(s)  requests/s  requests  429s");
    let mut from = started;
    while from < finished {
        let (rate, n, refused) = rate_in(&log, from, from + 5.0);
        eprintln!(
            "{:>7}  {:>4.0}-{:<4.0}  {rate:>10.2}  {n:>8}  {refused:>4}",
            if from < raised { "3 r/s" } else { "10 r/s" },
            from - started,
            from - started + 5.0
        );
        from += 5.0;
    }
    eprintln!("effective rate (s, rate): {samples:?}");

    // Settled at the upstream's rate, with few 429s.
    let (rate, n, refused) = rate_in(&log, started + 30.0, raised);
    assert!(
        (2.5..=3.3).contains(&rate),
        "fleet rate {rate:.2} r/s at an upstream of 3 r/s"
    );
    assert!(
        refused * 10 < n,
        "{refused} of {n} requests refused after settling"
    );
    // Back to ≥ 9 r/s within 60 s of the raise (a 5 s window).
    let climbed = (0..=110)
        .map(|i| raised + f64::from(i) * 0.5)
        .find(|t| *t + 5.0 <= raised + 60.0 && rate_in(&log, *t, *t + 5.0).0 >= 9.0);
    assert!(
        climbed.is_some(),
        "no 5 s window at ≥ 9 r/s within 60 s of the raise"
    );
    eprintln!(
        "≥ 9 r/s from {:.1} s after the raise",
        climbed.unwrap_or_default() - raised
    );
    // Every page served once.
    for resource in RESOURCES {
        for cursor in 0..PAGES {
            let served = log
                .iter()
                .filter(|(s, r, c, _)| *s == 200 && r == resource && *c == cursor)
                .count();
            assert_eq!(served, 1, "{resource} page {cursor} served {served} times");
        }
    }
    drop(nginx);
}
