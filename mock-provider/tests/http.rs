//! The mock over real HTTP/1.1 (a raw `TcpStream`; the crate has no HTTP client).

use std::time::Duration;

use llmq_mock_provider::{spawn, Faults, MockConfig, MockHandle};
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

#[tokio::test]
async fn huge_error_bodies_are_multibyte_text() -> anyhow::Result<()> {
    let mock = spawn("127.0.0.1:0", MockConfig::default()).await?;
    // Set over HTTP, as a test in another process would.
    let r = call(
        &mock,
        "PUT",
        "/_mock/faults",
        &[],
        Some(&json!({"outage": true, "huge_error_body_bytes": 100_000})),
    )
    .await?;
    assert_eq!(r.status, 200);
    let r = call(
        &mock,
        "POST",
        "/v1/chat/completions",
        &[BEARER],
        Some(&chat("x")),
    )
    .await?;
    assert_eq!(r.status, 503);
    assert!(r
        .header("content-type")
        .unwrap_or_default()
        .starts_with("application/json"));
    let v = r.json()?;
    assert_eq!(v["error"]["type"], "server_error");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!((99_990..=100_000).contains(&msg.len()), "{}", msg.len());
    assert!(msg.starts_with("服务器暂时不可用") && msg.contains('🔥'));
    // Most byte offsets fall inside a character.
    assert!((1..=4).any(|i| !msg.is_char_boundary(msg.len() / 2 + i)));

    let ant_error = |v: &Value, kind: &str| {
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], kind);
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!((99_990..=100_000).contains(&msg.len()), "{}", msg.len());
        assert!(msg.contains("请稍后再试"));
    };
    mock.set_faults(Faults {
        error_rate: 1.0,
        huge_error_body_bytes: 100_000,
        ..Faults::default()
    });
    let m = "/v1/messages";
    let r = call(
        &mock,
        "POST",
        m,
        &[ANT_KEY, ANT_VERSION],
        Some(&ant(json!("x"))),
    )
    .await?;
    assert_eq!(r.status, 500);
    ant_error(&r.json()?, "api_error");
    mock.set_faults(Faults {
        overloaded_rate: 1.0,
        huge_error_body_bytes: 100_000,
        ..Faults::default()
    });
    let r = call(
        &mock,
        "POST",
        m,
        &[ANT_KEY, ANT_VERSION],
        Some(&ant(json!("x"))),
    )
    .await?;
    assert_eq!(r.status, 529);
    ant_error(&r.json()?, "overloaded_error");

    // The raw variant: the text alone, not JSON.
    mock.set_faults(Faults {
        overloaded_rate: 1.0,
        huge_error_body_bytes: 50_000,
        huge_error_body_raw: true,
        ..Faults::default()
    });
    for (path, headers, body, status) in [
        ("/v1/chat/completions", &[BEARER][..], chat("x"), 503),
        (m, &[ANT_KEY, ANT_VERSION][..], ant(json!("x")), 529),
    ] {
        let r = call(&mock, "POST", path, headers, Some(&body)).await?;
        assert_eq!(r.status, status);
        assert!(r
            .header("content-type")
            .unwrap_or_default()
            .starts_with("text/plain"));
        assert!(r.json().is_err());
        assert!(
            (49_990..=50_000).contains(&r.body.len()),
            "{}",
            r.body.len()
        );
        assert!(r.body.starts_with("服务器暂时不可用"));
    }
    Ok(())
}

#[tokio::test]
async fn retry_after_is_sent_verbatim_on_429_503_529() -> anyhow::Result<()> {
    let config = MockConfig {
        limits: Some(llmq_mock_provider::Limits {
            rpm: Some(1),
            ..Default::default()
        }),
        faults: Faults {
            retry_after: Some("1e300".into()),
            ..Faults::default()
        },
        ..MockConfig::default()
    };
    let mock = spawn("127.0.0.1:0", config).await?;
    let openai = "/v1/chat/completions";
    let m = "/v1/messages";
    let ant_headers = [ANT_KEY, ANT_VERSION];
    let retry = |r: &Reply| {
        (
            r.header("retry-after").map(str::to_owned),
            r.header("retry-after-ms").map(str::to_owned),
        )
    };
    let both = |s: &str| (Some(s.to_owned()), Some(s.to_owned()));

    // Rate limits (both APIs): the first call fits, the second gets the verbatim value.
    for (path, headers, body) in [
        (openai, &[BEARER][..], chat("x")),
        (m, &ant_headers[..], ant(json!("x"))),
    ] {
        let r = call(&mock, "POST", path, headers, Some(&body)).await?;
        assert_eq!(r.status, 200);
        assert_eq!(retry(&r), (None, None));
        let r = call(&mock, "POST", path, headers, Some(&body)).await?;
        assert_eq!(r.status, 429, "{}", r.body);
        assert_eq!(retry(&r), both("1e300"));
    }

    // Faults: OpenAI 503, Anthropic 529, a 429 quota answer; set over HTTP too.
    for value in ["-5", "NaN", "99999999999999999999", "inf", ""] {
        let r = call(
            &mock,
            "PUT",
            "/_mock/faults",
            &[],
            Some(&json!({"overloaded_rate": 1.0, "retry_after": value})),
        )
        .await?;
        assert_eq!(r.status, 200);
        let r = call(&mock, "POST", openai, &[BEARER], Some(&chat("x"))).await?;
        assert_eq!((r.status, retry(&r)), (503, both(value)));
        let r = call(&mock, "POST", m, &ant_headers, Some(&ant(json!("x")))).await?;
        assert_eq!((r.status, retry(&r)), (529, both(value)));
    }
    mock.set_faults(Faults {
        quota_keys: vec!["sk-test-1234567890abcd".into()],
        retry_after: Some("-5".into()),
        ..Faults::default()
    });
    let r = call(&mock, "POST", openai, &[BEARER], Some(&chat("x"))).await?;
    assert_eq!((r.status, retry(&r)), (429, both("-5")));

    // Not a 429/503/529: untouched.
    mock.set_faults(Faults {
        error_rate: 1.0,
        retry_after: Some("7".into()),
        ..Faults::default()
    });
    let r = call(&mock, "POST", openai, &[BEARER], Some(&chat("x"))).await?;
    assert_eq!((r.status, retry(&r)), (500, (None, None)));

    // Not a valid header value: neither header, not even the computed ones.
    mock.set_faults(Faults {
        retry_after: Some("1\r\nx-injected: yes".into()),
        ..Faults::default()
    });
    let r = call(&mock, "POST", openai, &[BEARER], Some(&chat("x"))).await?;
    assert_eq!((r.status, retry(&r)), (429, (None, None)));
    assert!(r.header("x-injected").is_none());
    Ok(())
}

/// Reads the status line and headers of `conn`, returning the status, the head and the
/// body bytes read past it.
async fn read_head(conn: &mut tokio::net::TcpStream) -> anyhow::Result<(u16, String, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(raw[..end].to_vec())?;
            let status = head
                .split(' ')
                .nth(1)
                .ok_or_else(|| anyhow::anyhow!("no status"))?
                .parse()?;
            return Ok((status, head, raw[end + 4..].to_vec()));
        }
        let n = conn.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "closed before the headers");
        raw.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn endless_bodies_flow_until_the_client_leaves() -> anyhow::Result<()> {
    let mock = spawn("127.0.0.1:0", MockConfig::default()).await?;
    let cases = [
        (
            Faults {
                endless_body_rate: 1.0,
                ..Faults::default()
            },
            "/v1/chat/completions",
            &[BEARER][..],
            chat("x"),
            200,
            r#"{"id":"chatcmpl-mock","object":"chat.completion""#,
        ),
        (
            Faults {
                endless_body_rate: 1.0,
                ..Faults::default()
            },
            "/v1/messages",
            &[ANT_KEY, ANT_VERSION][..],
            ant(json!("x")),
            200,
            r#"{"id":"msg_mock","type":"message""#,
        ),
        (
            Faults {
                endless_error_body: true,
                ..Faults::default()
            },
            "/v1/chat/completions",
            &[BEARER][..],
            chat("x"),
            503,
            r#"{"error":{"type":"server_error""#,
        ),
        (
            Faults {
                endless_error_body: true,
                ..Faults::default()
            },
            "/v1/messages",
            &[ANT_KEY, ANT_VERSION][..],
            ant(json!("x")),
            503,
            r#"{"type":"error","error":{"type":"overloaded_error""#,
        ),
    ];
    for (faults, path, headers, body, status, prefix) in cases {
        mock.set_faults(faults);
        let mut conn = open(&mock, "POST", path, headers, &body.to_string()).await?;
        let (got, head, mut seen) = read_head(&mut conn).await?;
        assert_eq!(got, status, "{path}");
        assert!(head.contains("content-type: application/json"), "{head}");
        // Far more than any answer, and still coming.
        let mut buf = vec![0u8; 64 * 1024];
        while seen.len() < 512 * 1024 {
            let n = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await??;
            anyhow::ensure!(n > 0, "{path}: the endless body ended");
            seen.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&seen);
        assert!(text.contains(prefix), "{path}: {}", &text[..200]);
        assert!(text.contains(&"x".repeat(4096)));
        assert_eq!(mock.in_flight(), 1);
        // The client leaves: the generator goes with the connection.
        drop(conn);
        eventually("endless body dropped", || mock.in_flight() == 0).await?;
    }
    let s = mock.stats();
    assert_eq!((s.requests_total, s.succeeded, s.rejected), (4, 0, 4));
    Ok(())
}

#[tokio::test]
async fn streams_can_stop_mid_event() -> anyhow::Result<()> {
    let mock = spawn(
        "127.0.0.1:0",
        MockConfig {
            faults: Faults {
                stream_cut_mid_event_rate: 1.0,
                ..Faults::default()
            },
            ..MockConfig::default()
        },
    )
    .await?;
    let mut openai = chat("a few words to stream here");
    openai["stream"] = json!(true);
    let mut anthropic = ant(json!("a few words to stream here"));
    anthropic["stream"] = json!(true);
    for (path, headers, body) in [
        ("/v1/chat/completions", &[BEARER][..], openai),
        ("/v1/messages", &[ANT_KEY, ANT_VERSION][..], anthropic),
    ] {
        // `call` reads to the end: the body ends cleanly (last chunk sent).
        let r = call(&mock, "POST", path, headers, Some(&body)).await?;
        assert_eq!(r.status, 200);
        assert!(!r.body.ends_with("\n\n"), "{path}: {}", r.body);
        let events: Vec<&str> = r.body.split("\n\n").collect();
        let (last, whole) = events
            .split_last()
            .ok_or_else(|| anyhow::anyhow!("no events"))?;
        assert!(!whole.is_empty(), "{path}: no whole event before the cut");
        for e in whole {
            let data = e
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .ok_or_else(|| anyhow::anyhow!("{path}: no data in {e:?}"))?;
            serde_json::from_str::<Value>(data)?;
        }
        let data = last
            .split_once("data: ")
            .map(|(_, d)| d)
            .ok_or_else(|| anyhow::anyhow!("{path}: cut before data: {last:?}"))?;
        assert!(data.starts_with('{') && data.len() > 1, "{path}: {last:?}");
        assert!(serde_json::from_str::<Value>(data).is_err());
        assert!(!r.body.contains("[DONE]") && !r.body.contains("message_stop"));
    }
    Ok(())
}

#[tokio::test]
async fn hang_reads_requests_and_never_answers() -> anyhow::Result<()> {
    let mock = spawn("127.0.0.1:0", MockConfig::default()).await?;
    mock.set_faults(Faults {
        hang: true,
        ..Faults::default()
    });
    let mut conns = Vec::new();
    for (path, headers, body) in [
        ("/v1/chat/completions", &[BEARER][..], chat("hung")),
        (
            "/v1/messages",
            &[ANT_KEY, ANT_VERSION][..],
            ant(json!("hung")),
        ),
        // Even a request that would be refused.
        ("/v1/chat/completions", &[][..], chat("hung")),
    ] {
        conns.push(open(&mock, "POST", path, headers, &body.to_string()).await?);
    }
    eventually("all arrived", || mock.stats().requests_total == 3).await?;
    for conn in &mut conns {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_millis(300), conn.read(&mut buf)).await;
        assert!(read.is_err(), "answered: {read:?}");
    }
    let s = mock.stats();
    assert_eq!((s.requests_total, s.succeeded, s.rejected), (3, 0, 0));
    assert_eq!(mock.calls().get("hung"), Some(&3));
    assert_eq!(mock.in_flight(), 3);
    drop(conns);
    eventually("hung requests dropped", || mock.in_flight() == 0).await?;
    // Admin routes still answer.
    let r = call(&mock, "GET", "/_mock/stats", &[], None).await?;
    assert_eq!(r.json()?["requests_total"], 3);
    Ok(())
}

fn limited(limits: llmq_mock_provider::Limits) -> MockConfig {
    MockConfig {
        limits: Some(limits),
        ..MockConfig::default()
    }
}

/// The header `name` of `r` as a number.
fn num(r: &Reply, name: &str) -> Option<u64> {
    r.header(name).and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn per_second_limits_refuse_on_requests_and_report_the_minute() -> anyhow::Result<()> {
    // 120 RPM enforced per second: 2 a second (one more every 500 ms), 120 a minute.
    let mock = spawn(
        "127.0.0.1:0",
        limited(llmq_mock_provider::Limits {
            rpm: Some(120),
            tpm: Some(100_000),
            input_tpm: Some(100_000),
            output_tpm: Some(100_000),
            per_second: true,
            ..Default::default()
        }),
    )
    .await?;
    let ant_headers = [ANT_KEY, ANT_VERSION];
    for (path, headers, body) in [
        ("/v1/chat/completions", &[BEARER][..], chat("x")),
        ("/v1/messages", &ant_headers[..], ant(json!("x"))),
    ] {
        let anthropic = path == "/v1/messages";
        let (limit, remaining) = if anthropic {
            (
                "anthropic-ratelimit-requests-limit",
                "anthropic-ratelimit-requests-remaining",
            )
        } else {
            (
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
            )
        };
        for left in [119, 118] {
            let r = call(&mock, "POST", path, headers, Some(&body)).await?;
            assert_eq!(r.status, 200, "{path}: {}", r.body);
            assert_eq!(
                (num(&r, limit), num(&r, remaining)),
                (Some(120), Some(left))
            );
        }
        // The third in the same second: the second's bucket is empty, the minute's is not.
        let r = call(&mock, "POST", path, headers, Some(&body)).await?;
        assert_eq!(r.status, 429, "{path}: {}", r.body);
        assert_eq!((num(&r, limit), num(&r, remaining)), (Some(120), Some(118)));
        assert_eq!(r.header("retry-after"), Some("1"));
        let error = &r.json()?["error"];
        let message = error["message"].as_str().unwrap_or_default();
        if anthropic {
            assert_eq!(error["type"], "rate_limit_error");
            assert!(
                message.contains("rate limit of 120 requests per minute"),
                "{message}"
            );
            for dim in ["input-tokens", "output-tokens", "tokens"] {
                let name = format!("anthropic-ratelimit-{dim}-remaining");
                assert!(num(&r, &name).is_some(), "{name} missing on the 429");
            }
        } else {
            assert_eq!(error["type"], "requests");
            assert_eq!(error["code"], "rate_limit_exceeded");
            assert!(message.contains("on requests per min (RPM): Limit 120, Used 2, Requested 1"));
            let ms = num(&r, "retry-after-ms").unwrap_or(0);
            assert!((1..=500).contains(&ms), "retry-after-ms {ms}");
            assert!(num(&r, "x-ratelimit-remaining-tokens").is_some());
        }
    }
    let s = mock.stats();
    assert_eq!(s.rate_limited, 2);
    assert_eq!(s.rate_limited_by_dim.get("requests"), Some(&2));
    Ok(())
}

#[tokio::test]
async fn limits_are_per_key_or_per_key_and_model() -> anyhow::Result<()> {
    let other_model = |model: &str| {
        let mut body = chat("x");
        body["model"] = json!(model);
        body
    };
    for per_model in [false, true] {
        let mock = spawn(
            "127.0.0.1:0",
            limited(llmq_mock_provider::Limits {
                rpm: Some(1),
                per_model,
                ..Default::default()
            }),
        )
        .await?;
        let openai = "/v1/chat/completions";
        let r = call(&mock, "POST", openai, &[BEARER], Some(&other_model("a"))).await?;
        assert_eq!(r.status, 200);
        let r = call(&mock, "POST", openai, &[BEARER], Some(&other_model("b"))).await?;
        assert_eq!(r.status, if per_model { 200 } else { 429 }, "{}", r.body);
        let r = call(&mock, "POST", openai, &[BEARER], Some(&other_model("a"))).await?;
        assert_eq!(r.status, 429);
        let models: Vec<String> = mock.admitted().into_iter().map(|a| a.model).collect();
        assert_eq!(models, if per_model { vec!["a", "b"] } else { vec!["a"] });
    }
    Ok(())
}

#[tokio::test]
async fn max_concurrent_refuses_then_releases_when_streams_end_or_drop() -> anyhow::Result<()> {
    let mock = spawn(
        "127.0.0.1:0",
        MockConfig {
            chunk_delay: Duration::from_millis(100),
            limits: Some(llmq_mock_provider::Limits {
                max_concurrent: Some(1),
                ..Default::default()
            }),
            ..MockConfig::default()
        },
    )
    .await?;
    let mut openai = chat("a streamed answer");
    openai["stream"] = json!(true);
    let mut anthropic = ant(json!("a streamed answer"));
    anthropic["stream"] = json!(true);
    let ant_headers = [ANT_KEY, ANT_VERSION];
    for (path, headers, stream, plain) in [
        ("/v1/chat/completions", &[BEARER][..], &openai, chat("x")),
        (
            "/v1/messages",
            &ant_headers[..],
            &anthropic,
            ant(json!("x")),
        ),
    ] {
        // A stream holds the key's one slot while its body flows.
        let mut conn = open(&mock, "POST", path, headers, &stream.to_string()).await?;
        let (status, _, _) = read_head(&mut conn).await?;
        assert_eq!(status, 200);
        let r = call(&mock, "POST", path, headers, Some(&plain)).await?;
        assert_eq!(r.status, 429, "{path}: {}", r.body);
        let error = &r.json()?["error"];
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains("concurrent"), "{message}");
        if path == "/v1/messages" {
            assert_eq!(error["type"], "rate_limit_error");
        } else {
            assert!(message.contains("Limit 1"), "{message}");
            assert_eq!(
                (&error["type"], &error["code"]),
                (&json!("requests"), &json!("rate_limit_exceeded"))
            );
        }
        // The client goes away mid-stream: the slot is released.
        drop(conn);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let r = call(&mock, "POST", path, headers, Some(&plain)).await?;
            if r.status == 200 {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{path}: never released"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A stream read to its end releases it too.
        let r = call(&mock, "POST", path, headers, Some(stream)).await?;
        assert_eq!(r.status, 200);
        let r = call(&mock, "POST", path, headers, Some(&plain)).await?;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    let s = mock.stats();
    assert_eq!(s.rate_limited_by_dim.get("concurrent"), Some(&2));
    assert_eq!(s.rate_limited, 2);
    for key in s.by_key.values() {
        assert_eq!(key.max_in_flight_seen, 1, "{key:?}");
    }
    Ok(())
}

#[tokio::test]
async fn token_limits_name_their_dimension() -> anyhow::Result<()> {
    // OpenAI: tokens per minute (prompt + max_tokens).
    let mock = spawn(
        "127.0.0.1:0",
        limited(llmq_mock_provider::Limits {
            tpm: Some(1000),
            ..Default::default()
        }),
    )
    .await?;
    let mut body = chat("x");
    body["max_tokens"] = json!(600);
    let path = "/v1/chat/completions";
    let r = call(&mock, "POST", path, &[BEARER], Some(&body)).await?;
    assert_eq!(r.status, 200);
    let left = num(&r, "x-ratelimit-remaining-tokens").unwrap_or(0);
    assert!((380..400).contains(&left), "{left}");
    let r = call(&mock, "POST", path, &[BEARER], Some(&body)).await?;
    assert_eq!(r.status, 429);
    assert_eq!(num(&r, "x-ratelimit-remaining-tokens"), Some(left));
    let error = &r.json()?["error"];
    assert_eq!(error["type"], "tokens");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("on tokens per min (TPM): Limit 1000"),
        "{message}"
    );
    assert_eq!(mock.stats().rate_limited_by_dim.get("tokens"), Some(&1));

    // Anthropic: input and output tokens per minute, each on its own.
    let long = "y".repeat(3000); // 750 tokens + 3 for the message
    for (input_tpm, output_tpm, content, dim, words) in [
        (
            1000,
            100_000,
            long.as_str(),
            "input_tokens",
            "1,000 input tokens",
        ),
        (100_000, 100, "x", "output_tokens", "100 output tokens"),
    ] {
        let mock = spawn(
            "127.0.0.1:0",
            limited(llmq_mock_provider::Limits {
                input_tpm: Some(input_tpm),
                output_tpm: Some(output_tpm),
                ..Default::default()
            }),
        )
        .await?;
        let body = ant(json!(content));
        let headers = [ANT_KEY, ANT_VERSION];
        let r = call(&mock, "POST", "/v1/messages", &headers, Some(&body)).await?;
        assert_eq!(r.status, 200, "{}", r.body);
        let r = call(&mock, "POST", "/v1/messages", &headers, Some(&body)).await?;
        assert_eq!(r.status, 429, "{dim}");
        assert_eq!(r.json()?["error"]["type"], "rate_limit_error");
        let message = r.json()?["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            message.contains(&format!("rate limit of {words} per minute")),
            "{message}"
        );
        assert!(num(&r, "retry-after").is_some_and(|s| s >= 1));
        let input = num(&r, "anthropic-ratelimit-input-tokens-remaining");
        let output = num(&r, "anthropic-ratelimit-output-tokens-remaining");
        let tokens = num(&r, "anthropic-ratelimit-tokens-remaining");
        assert_eq!(tokens, input.min(output), "the most restrictive");
        // max_tokens charged once, not for the 429 (give or take what refilled since).
        let once = output_tpm - 64;
        assert!(
            output.is_some_and(|o| (once..once + output_tpm / 100).contains(&o)),
            "{output:?}"
        );
        assert_eq!(mock.stats().rate_limited_by_dim.get(dim), Some(&1));
    }
    Ok(())
}
