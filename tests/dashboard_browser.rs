//! The dashboard in a real browser: headless Chromium (Debian's `chromium`,
//! driven through `chromedriver` by the W3C WebDriver protocol) signs in,
//! loads the overview while a worker process drains a workload, sees the
//! numbers change without a reload, takes a screenshot, and pauses a
//! dataset with the page's own button.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use syncq::dashboard::{DashboardOptions, router};

const TOKEN: &str = "browser-test-token";
const WAIT: Duration = Duration::from_secs(30);
/// The key of an element reference in W3C WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Chromium and its driver, installed from Debian's packages if missing
/// and this runs as root (as CI does).
fn browser() -> (PathBuf, PathBuf) {
    let find = || {
        let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())?;
        let driver = PathBuf::from("/usr/bin/chromedriver");
        driver.exists().then_some((chromium, driver))
    };
    if let Some(found) = find() {
        return found;
    }
    common::apt_install_if_root(&["chromium", "chromium-driver"]);
    find().expect(
        "Chromium is not installed: apt-get install -y chromium chromium-driver (.ci/run does)",
    )
}

/// A chromedriver process, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_driver(driver: &PathBuf) -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    common::wait_for("chromedriver answers", WAIT, || {
        let status = http.get(format!("{url}/status")).send();
        async move {
            match status.await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            }
        }
    })
    .await;
    Driver { child, url }
}

/// A WebDriver session: the few commands this test needs.
struct Session {
    http: reqwest::Client,
    base: String,
}

impl Session {
    async fn new(driver: &Driver, chromium: &PathBuf) -> Session {
        let http = reqwest::Client::new();
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1360,1000"]
            }
        } } });
        let answer: Value = http
            .post(format!("{}/session", driver.url))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {answer}"))
            .to_string();
        Session {
            http,
            base: format!("{}/session/{id}", driver.url),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if !body.is_null() {
            request = request.json(&body);
        }
        let answer: Value = request.send().await.unwrap().json().await.unwrap();
        if answer["value"]["error"].is_string() {
            panic!("WebDriver {path}: {answer}");
        }
        answer["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    async fn find(&self, css: &str) -> String {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_string()
    }

    async fn run(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
    }

    async fn text(&self, css: &str) -> String {
        let css = serde_json::to_string(css).unwrap();
        self.run(&format!(
            "var e = document.querySelector({css}); return e ? e.textContent : null;"
        ))
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            json!({}),
        )
        .await;
    }

    async fn screenshot(&self) -> Vec<u8> {
        let data = self
            .call(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        decode_base64(data.as_str().unwrap_or_default().as_bytes())
            .expect("the screenshot is base64")
    }

    async fn close(self) {
        let _ = self.http.delete(&self.base).send().await;
    }
}

/// Standard base64 (the screenshot), without a crate for it.
fn decode_base64(input: &[u8]) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let clean: Vec<u8> = input
        .iter()
        .copied()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    for chunk in clean.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= u32::from(value(*c)?) << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn the_overview_is_live_in_a_browser_and_its_buttons_act(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let (chromium, driver) = browser();
    let db = common::connect(&opts).await;
    // A workload that takes a while: 20 datasets of sleeping tasks.
    sqlx::query(
        "INSERT INTO syncq.tasks (dataset_id, kind, payload)
         SELECT 'feed-' || (i % 20), 'sleep', '{\"ms\": 40}' FROM generate_series(1, 4000) i",
    )
    .execute(&db)
    .await
    .unwrap();
    let worker = common::WorkerProcess::start(&common::url(&opts), &["--concurrency", "8"], &[]);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(
        db.clone(),
        DashboardOptions::default()
            .token(TOKEN)
            .refresh(Duration::from_millis(500)),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let base = format!("http://{addr}");

    let driver = start_driver(&driver).await;
    let browser = Session::new(&driver, &chromium).await;

    // Sign in through the page's own form.
    browser.go(&format!("{base}/login")).await;
    browser.type_into("#token", TOKEN).await;
    browser.click("#sign-in").await;
    common::wait_for("signed in, on the overview", WAIT, || async {
        browser.text("main h1").await == "Overview"
    })
    .await;

    // The live numbers change while the worker drains, without a reload.
    let loaded_at = browser.run("return window.syncqLoadedAt;").await;
    let first = browser.text("[data-live=\"succeeded\"]").await;
    common::wait_for("the succeeded count changes on the page", WAIT, || async {
        let now = browser.text("[data-live=\"succeeded\"]").await;
        !now.is_empty() && now != first
    })
    .await;
    assert_eq!(
        browser.run("return window.syncqLoadedAt;").await,
        loaded_at,
        "the page was not reloaded"
    );
    assert!(
        browser
            .run("return window.syncqRefreshes;")
            .await
            .as_u64()
            .unwrap_or(0)
            > 0
    );

    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-overview.png");
    std::fs::write(&shot, &png).unwrap();

    // An action through the page's own button.
    browser.go(&format!("{base}/datasets/feed-3")).await;
    browser
        .click("form[action$=\"/datasets/feed-3/pause\"] button")
        .await;
    common::wait_for("feed-3 is paused in its row", WAIT, || async {
        common::paused(&db, "feed-3").await
    })
    .await;
    assert!(browser.text("p.flash").await.contains("Paused"));

    browser.close().await;
    drop(worker);
}
