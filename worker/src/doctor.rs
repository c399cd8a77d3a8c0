//! `llmq doctor`: the diagnostic checklist for one configured provider, layer by layer —
//! network (DNS, TCP, TLS), identity, quota, rate limit, request, upstream — each with its
//! evidence, so a 429 that is really a reset, or a quota error, is named for what it is.
//! One minimal request (1 output token) is made. The key is shown redacted only.

use std::time::{Duration, Instant};

use llmq_producer_sdk::{ChatMessage, ChatRequest};
use secrecy::ExposeSecret;

use crate::outcome::{classify, ErrorClass, Outcome};
use crate::provider;
use crate::settings::Settings;

/// The layers, in the order a call crosses them.
pub const LAYERS: [&str; 6] = [
    "network",
    "identity",
    "quota",
    "rate_limit",
    "request",
    "upstream",
];

/// One layer's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Layer name.
    pub layer: &'static str,
    /// `Some(true)` passed, `Some(false)` failed, `None` not reached.
    pub ok: Option<bool>,
    /// What was seen.
    pub evidence: String,
}

/// The whole checklist.
#[derive(Debug, Clone)]
pub struct Report {
    /// Header lines (provider, base URL, redacted key).
    pub about: String,
    /// One entry per layer.
    pub checks: Vec<Check>,
}

impl Report {
    /// The first failing layer.
    pub fn failed(&self) -> Option<&Check> {
        self.checks.iter().find(|c| c.ok == Some(false))
    }

    /// Printable text.
    pub fn render(&self) -> String {
        let mut out = format!("{}\n", self.about);
        for c in &self.checks {
            let verdict = match c.ok {
                Some(true) => "ok",
                Some(false) => "FAIL",
                None => "-",
            };
            out.push_str(&format!(
                "  {:<11} {:<5} {}\n",
                c.layer, verdict, c.evidence
            ));
        }
        match self.failed() {
            Some(c) => out.push_str(&format!(
                "verdict: the {} layer failed: {}\n",
                c.layer, c.evidence
            )),
            None => out.push_str("verdict: healthy\n"),
        }
        out
    }
}

/// `sk-…abcd`: enough to tell keys apart, never enough to use one.
pub fn redact(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "***".into();
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

fn check(layer: &'static str, ok: Option<bool>, evidence: impl Into<String>) -> Check {
    Check {
        layer,
        ok,
        evidence: evidence.into(),
    }
}

/// Runs the checklist for `provider_name`, asking `model` for one token.
pub async fn run(settings: &Settings, provider_name: &str, model: &str) -> anyhow::Result<Report> {
    let p = settings.providers.get(provider_name).ok_or_else(|| {
        anyhow::anyhow!(
            "provider `{provider_name}` is not configured (have: {})",
            settings
                .providers
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let url = reqwest::Url::parse(&p.base_url)?;
    let about = format!(
        "provider {provider_name} ({}) at {} with key {}{}",
        p.kind,
        p.base_url,
        redact(p.api_key.expose_secret()),
        if p.proxy.is_some() {
            " through its proxy"
        } else {
            ""
        }
    );
    let mut checks = Vec::new();
    let not_reached = |from: usize, checks: &mut Vec<Check>| {
        for layer in &LAYERS[from..] {
            checks.push(check(layer, None, "not reached"));
        }
    };

    // Network: DNS, TCP, (TLS is proven by the request itself on https).
    let host = url.host_str().unwrap_or_default().to_owned();
    let port = url.port_or_known_default().unwrap_or(443);
    let t = Instant::now();
    let addrs: Vec<std::net::SocketAddr> =
        match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(a) => a.collect(),
            Err(e) => {
                checks.push(check(
                    "network",
                    Some(false),
                    format!("DNS lookup of {host} failed: {e}"),
                ));
                not_reached(1, &mut checks);
                return Ok(Report { about, checks });
            }
        };
    let dns = format!(
        "DNS {host} → {} ({} ms)",
        addrs.first().map(ToString::to_string).unwrap_or_default(),
        t.elapsed().as_millis()
    );
    let Some(addr) = addrs.first().copied() else {
        checks.push(check(
            "network",
            Some(false),
            format!("DNS lookup of {host} returned no address"),
        ));
        not_reached(1, &mut checks);
        return Ok(Report { about, checks });
    };
    let t = Instant::now();
    match tokio::time::timeout(
        Duration::from_millis(p.connect_timeout_ms),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            checks.push(check(
                "network",
                Some(false),
                format!("{dns}; TCP connect to {addr} failed: {e}"),
            ));
            not_reached(1, &mut checks);
            return Ok(Report { about, checks });
        }
        Err(_) => {
            checks.push(check(
                "network",
                Some(false),
                format!(
                    "{dns}; TCP connect to {addr} timed out after {} ms",
                    p.connect_timeout_ms
                ),
            ));
            not_reached(1, &mut checks);
            return Ok(Report { about, checks });
        }
    }
    let tcp = format!("TCP {addr} ({} ms)", t.elapsed().as_millis());
    let tls = if url.scheme() == "https" {
        "; TLS checked by the request"
    } else {
        "; no TLS (http)"
    };

    // One minimal request.
    let adapter = provider::build(provider_name, p)?;
    let request = ChatRequest {
        messages: vec![ChatMessage::user("ping")],
        max_tokens: Some(1),
        temperature: None,
        top_p: None,
        stop: None,
        extra: serde_json::Map::new(),
    };
    let t = Instant::now();
    let outcome = classify(
        adapter
            .complete(model, &request, &crate::provider::IGNORE)
            .await,
    );
    let ms = t.elapsed().as_millis();
    let net = format!("{dns}; {tcp}{tls}");
    match outcome {
        Outcome::Succeeded(reply) => {
            checks.push(check("network", Some(true), net));
            checks.push(check("identity", Some(true), "key accepted"));
            checks.push(check("quota", Some(true), "not exhausted"));
            let r = reply.remaining;
            let remaining = match (r.requests, r.tokens.or(r.input_tokens)) {
                (None, None) => "no rate-limit headers sent".to_owned(),
                (req, tok) => format!(
                    "remaining: {} requests, {} tokens",
                    req.map_or("?".into(), |v| v.to_string()),
                    tok.map_or("?".into(), |v| v.to_string())
                ),
            };
            checks.push(check("rate_limit", Some(true), remaining));
            checks.push(check(
                "request",
                Some(true),
                format!("model {} answered", reply.model),
            ));
            checks.push(check(
                "upstream",
                Some(true),
                format!(
                    "HTTP {} in {ms} ms, request id {}",
                    reply.status,
                    reply.request_id.unwrap_or_else(|| "-".into())
                ),
            ));
        }
        Outcome::RetryAfter(_, f) | Outcome::Fatal(f) => {
            let evidence = format!(
                "{} (HTTP {}, type {}, code {}, request id {}): {}",
                f.class.as_str(),
                f.http_status.map_or("-".into(), |s| s.to_string()),
                f.error_type.as_deref().unwrap_or("-"),
                f.error_code.as_deref().unwrap_or("-"),
                f.request_id.as_deref().unwrap_or("-"),
                f.message
            );
            let failed_at = match f.class {
                ErrorClass::Network | ErrorClass::Timeout => 0,
                ErrorClass::Auth | ErrorClass::Permission => 1,
                ErrorClass::QuotaExhausted => 2,
                ErrorClass::RateLimited => 3,
                ErrorClass::BadRequest | ErrorClass::RequestTooLarge => 4,
                ErrorClass::Upstream => 5,
            };
            for (i, layer) in LAYERS.iter().enumerate() {
                if i < failed_at {
                    let e = if i == 0 {
                        net.clone()
                    } else {
                        "passed".to_owned()
                    };
                    checks.push(check(layer, Some(true), e));
                } else if i == failed_at {
                    checks.push(check(layer, Some(false), evidence.clone()));
                } else {
                    checks.push(check(layer, None, "not reached"));
                }
            }
        }
    }
    Ok(Report { about, checks })
}
