//! The web page in headless Chromium (Debian's `chromium` + `chromium-driver`, installed
//! by `scripts/browser.sh`): type a prompt, submit, see it wait its turn, see it being
//! generated, see the final text. Screenshots go to `target/screenshots/`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{ClientBuilder, Locator};
use llmq_mock_provider::MockConfig;
use llmq_producer_sdk::{ChatMessage, NewJob};
use llmq_tests::{spawn_app_with, AppOptions};
use llmq_worker::settings::RateLimitSettings;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_waiting_then_generating_then_the_text() {
    let driver = which("chromedriver").expect(
        "chromedriver not found: run `bash scripts/browser.sh` (installs Debian's chromium and chromium-driver)",
    );
    let chromium = which("chromium").expect("chromium not found: run `bash scripts/browser.sh`");

    // 30 requests a minute and two jobs ahead: the page's job waits its turn. Words arrive
    // 80 ms apart, so generation is visible.
    let app = spawn_app_with(AppOptions {
        mock: MockConfig {
            latency: Duration::from_millis(300),
            chunk_delay: Duration::from_millis(80),
            ..Default::default()
        },
        api: true,
        workers: 1,
        concurrency: 1,
        rate_limit: Some(RateLimitSettings {
            rpm: Some(30),
            tpm: Some(1_000_000),
            request_burst_secs: 2.0,
            token_burst_secs: 60.0,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    for i in 0..2 {
        client
            .enqueue(
                NewJob::new(
                    "default",
                    "gpt-4o-mini",
                    vec![ChatMessage::user(format!("ahead {i}"))],
                )
                .max_tokens(8),
            )
            .await
            .unwrap();
    }

    let port = free_port();
    let mut chromedriver = tokio::process::Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromedriver");
    let webdriver = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if reqwest::get(format!("{webdriver}/status")).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,1000"]
        }),
    );
    // chromedriver is plain HTTP on localhost: no TLS stack needed.
    let browser = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&webdriver)
        .await
        .expect("a WebDriver session with headless Chromium");

    let prompt = "tell the user what llmq does while they wait for a model to answer them";
    browser.goto(&format!("{}/", app.api_url())).await.unwrap();
    browser
        .find(Locator::Id("prompt"))
        .await
        .unwrap()
        .send_keys(prompt)
        .await
        .unwrap();
    browser
        .find(Locator::Id("submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    let mut seen: Vec<(String, String)> = Vec::new();
    let mut partial_text = String::new();
    let mut shot_waiting = false;
    let mut shot_generating = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let final_text = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page never showed the result; saw {seen:?}"
        );
        let state_el = browser.find(Locator::Id("state")).await.unwrap();
        let state = state_el
            .attr("data-state")
            .await
            .unwrap()
            .unwrap_or_default();
        let words = state_el.text().await.unwrap();
        let text = browser
            .find(Locator::Id("text"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if seen.last().map(|s| &s.0) != Some(&state) && !state.is_empty() {
            seen.push((state.clone(), words.clone()));
        }
        if (state == "queued" || state == "waiting_budget") && !shot_waiting {
            let detail = browser
                .find(Locator::Id("detail"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if !detail.is_empty() {
                std::fs::write(
                    screenshots().join("page-waiting.png"),
                    browser.screenshot().await.unwrap(),
                )
                .unwrap();
                shot_waiting = true;
            }
        }
        if state == "running" && !text.is_empty() {
            if !shot_generating {
                std::fs::write(
                    screenshots().join("page-generating.png"),
                    browser.screenshot().await.unwrap(),
                )
                .unwrap();
                shot_generating = true;
            }
            if partial_text.is_empty() {
                partial_text = text.clone();
            }
        }
        if state == "succeeded" {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    std::fs::write(
        screenshots().join("page-done.png"),
        browser.screenshot().await.unwrap(),
    )
    .unwrap();

    let states: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
    assert!(
        states.contains(&"queued") || states.contains(&"waiting_budget"),
        "a waiting state was shown: {seen:?}"
    );
    assert!(
        states.contains(&"running"),
        "generating was shown: {seen:?}"
    );
    assert_eq!(states.last(), Some(&"succeeded"), "{seen:?}");
    let shown: Vec<&str> = seen.iter().map(|s| s.1.as_str()).collect();
    assert!(shown.contains(&"Generating"), "in plain words: {shown:?}");
    assert_eq!(final_text, format!("mock reply to: {prompt}"));
    assert!(
        !partial_text.is_empty()
            && final_text.starts_with(&partial_text)
            && partial_text.len() < final_text.len(),
        "text was shown while being written: {partial_text:?}"
    );
    let _ = browser.close().await;
    let _ = chromedriver.kill().await;
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}
