//! The mock over real HTTP/1.1 (a raw `TcpStream`; the crate has no HTTP client).

use std::time::Duration;

use llmq_mock_provider::{spawn, MockConfig, MockHandle};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&self.body)?)
    }
}

/// Sends one request (any body text) and returns the open connection, unread.
async fn open(
    mock: &MockHandle,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<tokio::net::TcpStream> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        mock.addr,
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let mut stream = tokio::net::TcpStream::connect(mock.addr).await?;
    stream.write_all(req.as_bytes()).await?;
    Ok(stream)
}

async fn call(
    mock: &MockHandle,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> anyhow::Result<Reply> {
    let body = body.map(Value::to_string).unwrap_or_default();
    call_raw(mock, method, path, headers, &body).await
}

async fn call_raw(
    mock: &MockHandle,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<Reply> {
    let mut stream = open(mock, method, path, headers, body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let raw = String::from_utf8(raw)?;
    let (head, rest) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no header end in {raw:?}"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .ok_or_else(|| anyhow::anyhow!("no status line"))?
        .parse()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_owned()
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut s: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s
            .split_once("\r\n")
            .ok_or_else(|| anyhow::anyhow!("bad chunk"))?;
        let size = usize::from_str_radix(size.trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(
            rest.get(..size)
                .ok_or_else(|| anyhow::anyhow!("short chunk"))?,
        );
        s = rest.get(size + 2..).unwrap_or_default();
    }
}

fn chat(content: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": content}
    ]})
}

const BEARER: (&str, &str) = ("authorization", "Bearer sk-test-1234567890abcd");

#[tokio::test]
async fn openai_success_is_deterministic_and_counted() -> anyhow::Result<()> {
    let mock = spawn("127.0.0.1:0", MockConfig::default()).await?;
    let r = call(
        &mock,
        "POST",
        "/v1/chat/completions",
        &[BEARER],
        Some(&chat("hello there")),
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.header("x-request-id").unwrap_or_default();
    assert!(id.starts_with("req_") && id.len() == 36, "{id}");
    assert!(r.header("openai-processing-ms").is_some());
    assert!(r
        .header("content-type")
        .unwrap_or_default()
        .starts_with("application/json"));
    let v = r.json()?;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert!(v["id"]
        .as_str()
        .unwrap_or_default()
        .starts_with("chatcmpl-"));
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "mock reply to: hello there"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // "be brief" 2 + 4, "hello there" 3 + 4; "mock reply to: hello there" 26 chars → 7.
    assert_eq!(v["usage"]["prompt_tokens"], 13);
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(v["usage"]["total_tokens"], 20);
    let s = mock.stats();
    assert_eq!((s.requests_total, s.succeeded, s.rejected), (1, 1, 0));
    let k = s
        .by_key
        .get("sk-…abcd")
        .ok_or_else(|| anyhow::anyhow!("{s:?}"))?;
    assert_eq!((k.prompt_tokens, k.completion_tokens), (13, 7));
    mock.shutdown();
    Ok(())
}

#[tokio::test]
async fn openai_truncates_to_max_tokens() -> anyhow::Result<()> {
    let mock = spawn("127.0.0.1:0", MockConfig::default()).await?;
    let mut body = chat("a rather long question indeed");
    body["max_completion_tokens"] = json!(2);
    let r = call(
        &mock,
        "POST",
        "/v1/chat/completions",
        &[BEARER],
        Some(&body),
    )
    .await?;
    let v = r.json()?;
    assert_eq!(v["choices"][0]["message"]["content"], "mock rep");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 2);
    Ok(())
}

#[tokio::test]
async fn openai_errors_look_like_openai() -> anyhow::Result<()> {
    let config = MockConfig {
        accept_keys: Some(vec!["sk-good-key-000000".into()]),
        ..MockConfig::default()
    };
    let mock = spawn("127.0.0.1:0", config).await?;
    let r = call(&mock, "POST", "/v1/chat/completions", &[], Some(&chat("x"))).await?;
    assert_eq!(r.status, 401);
    assert!(r.header("x-request-id").is_some());

    let r = call(
        &mock,
        "POST",
        "/v1/chat/completions",
        &[BEARER],
        Some(&chat("x")),
    )
    .await?;
    assert_eq!(r.status, 401);
    let v = r.json()?;
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with("Incorrect API key provided: sk-te***bcd."),
        "{msg}"
    );
    assert!(!r.body.contains("sk-test-1234567890abcd"));

    let good = ("authorization", "Bearer sk-good-key-000000");
    let r = call(
        &mock,
        "POST",
        "/v1/chat/completions",
        &[good],
        Some(&json!({"model": "m", "messages": []})),
    )
    .await?;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()?["error"]["param"], "messages");

    let r = call(
        &mock,
        "POST",
        "/v1/chat/completions",
        &[good],
        Some(&json!({"messages": [{"role": "user", "content": "x"}]})),
    )
    .await?;
    assert_eq!(r.status, 400);

    let r = call(
        &mock,
        "POST",
        "/v1/chat/completions",
        &[good],
        Some(&json!({"model": "m", "messages": [{"content": "x"}]})),
    )
    .await?;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()?["error"]["param"], "messages[0].role");

    let s = mock.stats();
    assert_eq!((s.requests_total, s.succeeded, s.rejected), (5, 0, 5));
    Ok(())
}

#[tokio::test]
async fn openai_streams_chunks_and_usage() -> anyhow::Result<()> {
    let mock = spawn("127.0.0.1:0", MockConfig::default()).await?;
    let mut body = chat("stream me");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = call(
        &mock,
        "POST",
        "/v1/chat/completions",
        &[BEARER],
        Some(&body),
    )
    .await?;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap_or_default()
        .starts_with("text/event-stream"));
    let events: Vec<&str> = r
        .body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e))
        .collect::<Result<_, _>>()?;
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "mock reply to: stream me");
    let last = chunks.last().ok_or_else(|| anyhow::anyhow!("no chunks"))?;
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 6);
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "stop"));
    Ok(())
}

#[tokio::test]
async fn anthropic_messages() -> anyhow::Result<()> {
    let mock = spawn("127.0.0.1:0", MockConfig::default()).await?;
    let key = ("x-api-key", "sk-ant-test-0000wxyz");
    let version = ("anthropic-version", "2023-06-01");
    let body = json!({"model": "claude-3-5-haiku-latest", "max_tokens": 64, "system": "be brief",
        "messages": [{"role": "user", "content": "hi"}]});

    let r = call(&mock, "POST", "/v1/messages", &[key], Some(&body)).await?;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()?["error"]["type"], "invalid_request_error");

    let r = call(&mock, "POST", "/v1/messages", &[version], Some(&body)).await?;
    assert_eq!(r.status, 401);
    let v = r.json()?;
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "authentication_error");
    assert!(v["request_id"]
        .as_str()
        .unwrap_or_default()
        .starts_with("req_"));

    let r = call(&mock, "POST", "/v1/messages", &[key, version], Some(&body)).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.header("request-id").is_some());
    let v = r.json()?;
    assert_eq!(v["type"], "message");
    assert!(v["id"].as_str().unwrap_or_default().starts_with("msg_"));
    assert_eq!(v["content"][0]["text"], "mock reply to: hi");
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(v["usage"]["input_tokens"].as_u64().unwrap_or_default() > 0);

    let mut no_max = body.clone();
    no_max.as_object_mut().map(|o| o.remove("max_tokens"));
    let r = call(
        &mock,
        "POST",
        "/v1/messages",
        &[key, version],
        Some(&no_max),
    )
    .await?;
    assert_eq!(r.status, 400);
    Ok(())
}

#[tokio::test]
async fn admin_endpoints_and_latency() -> anyhow::Result<()> {
    let config = MockConfig {
        latency: Duration::from_millis(150),
        ..MockConfig::default()
    };
    let mock = spawn("127.0.0.1:0", config).await?;
    assert!(mock.base_url().starts_with("http://127.0.0.1:") && mock.base_url().ends_with("/v1"));
    let r = call(&mock, "GET", "/healthz", &[], None).await?;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));

    let t = std::time::Instant::now();
    let r = call(
        &mock,
        "POST",
        "/v1/chat/completions",
        &[BEARER],
        Some(&chat("slow")),
    )
    .await?;
    assert_eq!(r.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(150));

    let r = call(&mock, "GET", "/_mock/stats", &[], None).await?;
    assert_eq!(r.json()?["succeeded"], 1);
    let r = call(&mock, "POST", "/_mock/reset", &[], None).await?;
    assert_eq!(r.status, 200);
    assert_eq!(mock.stats().requests_total, 0);

    mock.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(call(&mock, "GET", "/healthz", &[], None).await.is_err());
    Ok(())
}

const ANT_KEY: (&str, &str) = ("x-api-key", "sk-ant-test-0000wxyz");
const ANT_VERSION: (&str, &str) = ("anthropic-version", "2023-06-01");

fn ant(content: Value) -> Value {
    json!({"model": "claude-3-5-haiku-latest", "max_tokens": 64,
        "messages": [{"role": "user", "content": content}]})
}

/// Polls `cond` every 10 ms for up to 2 s.
async fn eventually(what: &str, cond: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !cond() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[tokio::test]
async fn requests_count_at_arrival_even_when_the_client_gives_up() -> anyhow::Result<()> {
    let config = MockConfig {
        latency: Duration::from_millis(400),
        ..MockConfig::default()
    };
    let mock = spawn("127.0.0.1:0", config).await?;
    let conn = open(
        &mock,
        "POST",
        "/v1/chat/completions",
        &[BEARER],
        &chat("abandoned").to_string(),
    )
    .await?;
    // Counted while the answer is still being slept on.
    eventually("arrival counted", || mock.stats().requests_total == 1).await?;
    let s = mock.stats();
    assert_eq!((s.succeeded, s.rejected), (0, 0));
    assert_eq!(s.by_key.get("sk-…abcd").map(|k| k.requests), Some(1));
    drop(conn);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let s = mock.stats();
    // The handler went with the connection: never answered, never counted as answered.
    assert_eq!((s.requests_total, s.succeeded, s.rejected), (1, 0, 0));

    // A call that completes counts once, not again when answered.
    let r = call(
        &mock,
        "POST",
        "/v1/chat/completions",
        &[BEARER],
        Some(&chat("kept")),
    )
    .await?;
    assert_eq!(r.status, 200);
    let s = mock.stats();
    assert_eq!(s.requests_total, 2);
    assert_eq!(s.by_key.get("sk-…abcd").map(|k| k.requests), Some(2));
    Ok(())
}

#[tokio::test]
async fn calls_are_counted_per_prompt_at_arrival() -> anyhow::Result<()> {
    let mock = spawn("127.0.0.1:0", MockConfig::default()).await?;
    let openai = "/v1/chat/completions";
    for _ in 0..2 {
        let r = call(&mock, "POST", openai, &[BEARER], Some(&chat("alpha"))).await?;
        assert_eq!(r.status, 200);
    }
    // Rejected (no model), still recorded.
    let r = call(
        &mock,
        "POST",
        openai,
        &[BEARER],
        Some(&json!({"messages": [{"role": "user", "content": "beta"}]})),
    )
    .await?;
    assert_eq!(r.status, 400);
    // Text parts of an array; the last user message even when an assistant one follows.
    let body = json!({"model": "m", "messages": [
        {"role": "user", "content": "not this one"},
        {"role": "user", "content": [{"type": "text", "text": "gam"}, {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "ma"}]},
        {"role": "assistant", "content": "earlier answer"}
    ]});
    let r = call(&mock, "POST", openai, &[BEARER], Some(&body)).await?;
    assert_eq!(r.status, 200);
    // Not JSON: counted as a request, not per prompt.
    let r = call_raw(&mock, "POST", openai, &[BEARER], "{\"model\": ").await?;
    assert_eq!(r.status, 400);
    // Anthropic: refused for the missing key, still recorded; text blocks.
    let m = "/v1/messages";
    let r = call(&mock, "POST", m, &[ANT_VERSION], Some(&ant(json!("delta")))).await?;
    assert_eq!(r.status, 401);
    let blocks = ant(json!([{"type": "text", "text": "ep"}, {"type": "text", "text": "silon"}]));
    let r = call(&mock, "POST", m, &[ANT_KEY, ANT_VERSION], Some(&blocks)).await?;
    assert_eq!(r.status, 200, "{}", r.body);

    let want: std::collections::BTreeMap<String, u64> = [
        ("alpha", 2),
        ("beta", 1),
        ("gamma", 1),
        ("delta", 1),
        ("epsilon", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(mock.calls(), want);
    let r = call(&mock, "GET", "/_mock/calls", &[], None).await?;
    assert_eq!(r.json()?, serde_json::to_value(&want)?);
    let s = mock.stats();
    assert_eq!((s.requests_total, s.succeeded, s.rejected), (7, 4, 3));

    call(&mock, "POST", "/_mock/reset", &[], None).await?;
    assert!(mock.calls().is_empty());
    let r = call(&mock, "GET", "/_mock/calls", &[], None).await?;
    assert_eq!(r.json()?, json!({}));
    Ok(())
}
