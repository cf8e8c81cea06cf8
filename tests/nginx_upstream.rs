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
    common::apt_install_if_root(&["nginx"]);
    let binary = nginx_binary().expect("nginx is installed (apt-get install nginx; .ci/run does)");
    for resource in RESOURCES {
        let pages = dir.join("data").join(resource);
        std::fs::create_dir_all(&pages).unwrap();
        for cursor in 0..PAGES {
            let next = if cursor + 1 < PAGES {
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
             limit_req_zone $server_name zone=api:1m rate=10r/s;
             log_format upstream '$status $uri $arg_cursor';
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
    let child = Command::new(binary)
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

/// `(status, resource, cursor)` of every request nginx logged.
fn requests(dir: &Path) -> Vec<(u16, String, u64)> {
    std::fs::read_to_string(dir.join("access.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let status = parts.next()?.parse().ok()?;
            let uri = parts.next()?;
            let resource = uri.rsplit('/').nth(1)?.to_string();
            let cursor = parts.next()?.parse().ok()?;
            Some((status, resource, cursor))
        })
        .collect()
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn nginx_limit_req_answers_no_429_to_four_datasets_sharing_a_token(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
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
