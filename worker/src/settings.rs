//! One typed settings struct: defaults (`config/default.toml`) → optional file →
//! environment (`LLMQ_…`, nested keys joined by `__`). Secrets are wrapped so they cannot
//! be printed; invalid settings fail at startup naming the field.

use std::collections::BTreeMap;
use std::path::Path;

use llmq_producer_sdk::Limits;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

const DEFAULTS: &str = include_str!("../config/default.toml");

/// Everything llmq reads at startup.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// PostgreSQL URL (secret: may hold a password).
    pub database_url: SecretString,
    /// RabbitMQ URL (secret: may hold a password).
    pub amqp_url: SecretString,
    /// Queue/exchange name prefix shared with producers.
    pub queue_prefix: String,
    /// Run migrations on startup.
    pub migrate_on_start: bool,
    /// Provider for jobs that name none.
    pub default_provider: String,
    /// HTTP API.
    pub api: ApiSettings,
    /// Worker.
    pub worker: WorkerSettings,
    /// Job bounds checked at enqueue.
    pub limits: Limits,
    /// Redis URL of the fleet's shared budget (secret: may hold a password).
    pub redis_url: SecretString,
    /// The global RPM/TPM budget.
    pub admission: AdmissionSettings,
    /// Circuit breakers per provider.
    pub breaker: crate::breaker::BreakerSettings,
    /// Configured providers by name.
    pub providers: BTreeMap<String, ProviderSettings>,
    /// The file these settings were read from, if any (for reloads).
    #[serde(skip)]
    pub source: Option<std::path::PathBuf>,
}

/// HTTP API settings.
#[derive(Debug, Clone, Deserialize)]
pub struct ApiSettings {
    /// `host:port` to listen on (port 0 picks a free one).
    pub bind: String,
    /// Tenants and the SHA-256 (hex) of each one's bearer token (`llmq token NAME` makes
    /// one). None configured: the API is open and takes the tenant from the request.
    #[serde(default)]
    pub tenants: std::collections::BTreeMap<String, String>,
    /// Most Server-Sent Events streams open at once; one more is refused with `503
    /// too_many_streams` and a `Retry-After`.
    pub max_event_streams: u32,
    /// PostgreSQL connections of the pool the event streams read from, apart from the one
    /// enqueues and status reads use, so watchers never take an enqueue's connection.
    pub events_db_connections: u32,
}

/// Worker settings.
#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSettings {
    /// Jobs in flight per replica.
    pub concurrency: u16,
    /// Drain deadline on SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Backoff base.
    pub retry_base_ms: u64,
    /// Backoff cap.
    pub retry_cap_ms: u64,
    /// Serve Prometheus metrics at `http://<this>/metrics` (e.g. `0.0.0.0:9464`); none
    /// when unset.
    #[serde(default)]
    pub metrics_bind: Option<String>,
    /// A live job with nothing recorded for this long (a `retrying` one: this long past
    /// its next attempt) is taken to have lost its message and is republished (failed
    /// after 3 losses). Keep it above the longest call (timeouts) plus budget wait.
    #[serde(default = "default_repair_after_secs")]
    pub repair_after_secs: u64,
}

fn default_repair_after_secs() -> u64 {
    900
}

/// The global budget's behaviour.
#[derive(Debug, Clone, Deserialize)]
pub struct AdmissionSettings {
    /// `global`: shared by the fleet through Redis (default). `local`: each replica alone
    /// (the naive setup, kept for comparison benchmarks).
    pub mode: AdmissionMode,
    /// Prefix of the Redis keys; replicas sharing a provider account must share it.
    pub namespace: String,
    /// Fraction of every limit kept unused (default 0: the headers keep the budget at the
    /// provider's count; e.g. 0.02 when traffic llmq does not see shares the key).
    pub safety_margin: f64,
    /// A job whose slot is further away than this goes back to the queue uncharged.
    pub max_wait_secs: u64,
    /// Replicas assumed when Redis has never been reachable (the local fallback holds
    /// 1/replicas of each limit); otherwise the live count seen through Redis is used.
    pub assumed_replicas: u32,
    /// Per-call Redis timeout before falling back to the local limiter.
    pub redis_timeout_ms: u64,
    /// The longest fleet pause a provider 429 can cause; a longer `retry-after` is held
    /// to this (and logged as capped).
    #[serde(default = "default_max_pause_secs")]
    pub max_pause_secs: u64,
    /// Let the provider's `x-ratelimit-remaining-*` / `anthropic-ratelimit-*` headers set
    /// a budget whose bucket models the same minute they count (both ways: a budget with
    /// no state learns what the account really has left).
    #[serde(default = "yes")]
    pub learn_from_headers: bool,
}

fn default_max_pause_secs() -> u64 {
    60
}

/// See [`AdmissionSettings::mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdmissionMode {
    /// Fleet-wide through Redis.
    Global,
    /// Per replica (naive).
    Local,
}

/// A provider account's rate limits for a model (or all its models).
#[derive(Debug, Clone, Deserialize)]
pub struct RateLimitSettings {
    /// Requests per minute.
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Tokens per minute (OpenAI: prompt + max_tokens).
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Input tokens per minute (Anthropic).
    #[serde(default)]
    pub input_tpm: Option<u64>,
    /// Output tokens per minute (Anthropic).
    #[serde(default)]
    pub output_tpm: Option<u64>,
    /// The request bucket holds this many seconds' worth: 1 paces evenly for providers
    /// that enforce per second ("600 RPM may be enforced as 10 per second").
    #[serde(default = "one")]
    pub request_burst_secs: f64,
    /// Token buckets hold this many seconds' worth (60: a minute's, or no large prompt
    /// could ever pass).
    #[serde(default = "sixty")]
    pub token_burst_secs: f64,
    /// What the provider counts these limits against: `model` (each model name its own
    /// budget, as OpenAI and Anthropic do) or `key` (one budget for the key across every
    /// model, as relays and gateways do). Only a provider's `rate_limit` can be `key`;
    /// its `model_limits` are then charged together with it.
    #[serde(default)]
    pub scope: LimitScope,
    /// Calls allowed in flight at once across the fleet (an account's or gateway's cap on
    /// simultaneous requests); none = no cap.
    #[serde(default)]
    pub max_concurrent: Option<u64>,
}

impl Default for RateLimitSettings {
    /// No limit at all, with the default burst windows.
    fn default() -> Self {
        Self {
            rpm: None,
            tpm: None,
            input_tpm: None,
            output_tpm: None,
            request_burst_secs: one(),
            token_burst_secs: sixty(),
            scope: LimitScope::Model,
            max_concurrent: None,
        }
    }
}

/// See [`RateLimitSettings::scope`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitScope {
    /// Per model name.
    #[default]
    Model,
    /// Per API key, across models.
    Key,
}

fn one() -> f64 {
    1.0
}

fn sixty() -> f64 {
    60.0
}

/// Limits for one model, overriding the provider's `rate_limit`.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelRateLimit {
    /// Model name.
    pub model: String,
    /// Its limits.
    #[serde(flatten)]
    pub limits: RateLimitSettings,
}

/// Which API a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI chat completions.
    Openai,
    /// Anthropic messages.
    Anthropic,
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
        })
    }
}

/// One provider account.
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderSettings {
    /// API dialect.
    pub kind: ProviderKind,
    /// Base URL, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// API key (secret).
    pub api_key: SecretString,
    /// TCP connect timeout.
    pub connect_timeout_ms: u64,
    /// Read timeout: base part.
    pub timeout_base_secs: u64,
    /// Read timeout: per 1,000 requested output tokens.
    pub timeout_per_1k_tokens_secs: u64,
    /// Ask for streamed answers (the text is relayed as it is generated).
    #[serde(default = "yes")]
    pub stream: bool,
    /// A streamed answer silent this long between chunks is abandoned as a timeout.
    #[serde(default = "default_stall_secs")]
    pub stall_timeout_secs: u64,
    /// The largest answer read from the provider, in bytes: a longer one (a body that
    /// never ends) is abandoned as an upstream failure. Error bodies are read up to 64 KiB.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Limits of this account for every model (unless `model_limits` names it); none =
    /// no budget enforced for this provider.
    #[serde(default)]
    pub rate_limit: Option<RateLimitSettings>,
    /// Per-model limits.
    #[serde(default)]
    pub model_limits: Vec<ModelRateLimit>,
    /// Proxy for this provider only (`http://…`, `socks5://…`); without it the standard
    /// `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` / `NO_PROXY` variables apply.
    #[serde(default)]
    pub proxy: Option<SecretString>,
    /// Whether the provider gives back reserved tokens a call did not use (OpenAI does
    /// not: it counts max_tokens at admission).
    #[serde(default)]
    pub refund_unused: bool,
}

fn yes() -> bool {
    true
}

fn default_stall_secs() -> u64 {
    30
}

fn default_max_body_bytes() -> usize {
    8 * 1024 * 1024
}

impl ProviderSettings {
    /// The limits that apply to `model`.
    pub fn limits_for(&self, model: &str) -> Option<&RateLimitSettings> {
        self.model_limits
            .iter()
            .find(|m| m.model == model)
            .map(|m| &m.limits)
            .or(self.rate_limit.as_ref())
    }
}

/// A setting that cannot be used; says which and what to do.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The sources could not be read or parsed.
    #[error("configuration error: {0}")]
    Load(#[from] config::ConfigError),
    /// A value is present but unusable.
    #[error("configuration error: `{field}` {problem} (set it in the config file or as {env})")]
    Invalid {
        /// Dotted key.
        field: String,
        /// What is wrong.
        problem: String,
        /// The environment variable that sets it.
        env: String,
    },
}

fn env_name(field: &str) -> String {
    format!("LLMQ_{}", field.replace('.', "__").to_uppercase())
}

fn invalid(field: &str, problem: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        field: field.to_owned(),
        problem: problem.into(),
        env: env_name(field),
    }
}

impl Settings {
    /// Loads defaults, then `file` if given, then the environment; then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let mut settings: Settings = builder
            .add_source(
                config::Environment::with_prefix("LLMQ")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()?
            .try_deserialize()?;
        settings.source = file.map(Path::to_path_buf);
        settings.validate()?;
        Ok(settings)
    }

    /// The built-in defaults only (no file, no environment); for tests and tools that
    /// set fields themselves.
    pub fn defaults() -> Result<Self, SettingsError> {
        Ok(config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build()?
            .try_deserialize()?)
    }

    /// Checks values the types cannot.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let db = self.database_url.expose_secret();
        if !(db.starts_with("postgres://") || db.starts_with("postgresql://")) {
            return Err(invalid(
                "database_url",
                "must start with postgres:// (value hidden: it may hold a password)",
            ));
        }
        let amqp = self.amqp_url.expose_secret();
        if !(amqp.starts_with("amqp://") || amqp.starts_with("amqps://")) {
            return Err(invalid(
                "amqp_url",
                "must start with amqp:// or amqps:// (value hidden: it may hold a password)",
            ));
        }
        if self.queue_prefix.is_empty() || self.queue_prefix.contains(char::is_whitespace) {
            return Err(invalid(
                "queue_prefix",
                format!("`{}` must be non-empty without spaces", self.queue_prefix),
            ));
        }
        if self.api.bind.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "api.bind",
                format!("`{}` is not host:port, e.g. 127.0.0.1:8080", self.api.bind),
            ));
        }
        for (name, hash) in &self.api.tenants {
            if !llmq_producer_sdk::valid_tenant(name) {
                return Err(invalid(
                    &format!("api.tenants.{name}"),
                    "is not a valid tenant name: use 1-64 letters, digits, `_` or `-`",
                ));
            }
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    &format!("api.tenants.{name}"),
                    "must be the SHA-256 of the token in hex (64 characters), not the token itself; `llmq token NAME` prints both",
                ));
            }
        }
        if self.worker.concurrency == 0 {
            return Err(invalid("worker.concurrency", "must be at least 1"));
        }
        if self.worker.retry_base_ms == 0 || self.worker.retry_cap_ms < self.worker.retry_base_ms {
            return Err(invalid(
                "worker.retry_cap_ms",
                "must be at least worker.retry_base_ms, which must be > 0",
            ));
        }
        if !(0.0..0.5).contains(&self.admission.safety_margin) {
            return Err(invalid(
                "admission.safety_margin",
                "must be in [0, 0.5), e.g. 0.02",
            ));
        }
        if self.admission.max_pause_secs == 0 {
            return Err(invalid("admission.max_pause_secs", "must be at least 1"));
        }
        if self.admission.assumed_replicas == 0 {
            return Err(invalid("admission.assumed_replicas", "must be at least 1"));
        }
        let redis = self.redis_url.expose_secret();
        if !(redis.starts_with("redis://") || redis.starts_with("rediss://")) {
            return Err(invalid(
                "redis_url",
                "must start with redis:// (value hidden: it may hold a password)",
            ));
        }
        if self.providers.is_empty() {
            return Err(invalid(
                "providers",
                "is empty: configure at least one provider",
            ));
        }
        if !self.providers.contains_key(&self.default_provider) {
            return Err(invalid(
                "default_provider",
                format!(
                    "`{}` is not a configured provider (have: {})",
                    self.default_provider,
                    self.providers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        for (name, p) in &self.providers {
            let field = format!("providers.{name}.base_url");
            match reqwest::Url::parse(&p.base_url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => {
                    return Err(invalid(
                        &field,
                        format!("`{}` is not an http(s) URL", p.base_url),
                    ))
                }
            }
            if p.api_key.expose_secret().trim().is_empty() {
                return Err(invalid(&format!("providers.{name}.api_key"), "is empty"));
            }
            if let Some(proxy) = &p.proxy {
                if reqwest::Proxy::all(proxy.expose_secret()).is_err() {
                    return Err(invalid(
                        &format!("providers.{name}.proxy"),
                        "is not a proxy URL (value hidden: it may hold a password)",
                    ));
                }
            }
            let all = p
                .rate_limit
                .iter()
                .map(|l| (format!("providers.{name}.rate_limit"), l));
            let models = p.model_limits.iter().map(|m| {
                (
                    format!("providers.{name}.model_limits[{}]", m.model),
                    &m.limits,
                )
            });
            for (field, l) in all.chain(models) {
                for (dim, v) in [
                    ("rpm", l.rpm),
                    ("tpm", l.tpm),
                    ("input_tpm", l.input_tpm),
                    ("output_tpm", l.output_tpm),
                    ("max_concurrent", l.max_concurrent),
                ] {
                    if v == Some(0) {
                        return Err(invalid(
                            &format!("{field}.{dim}"),
                            "is 0: leave it out for no limit",
                        ));
                    }
                    if v.is_some_and(|v| v > 1_000_000_000_000) {
                        return Err(invalid(
                            &format!("{field}.{dim}"),
                            "is over 10^12: leave it out for no limit",
                        ));
                    }
                }
                for (what, secs) in [
                    ("request_burst_secs", l.request_burst_secs),
                    ("token_burst_secs", l.token_burst_secs),
                ] {
                    if !(secs.is_finite() && secs > 0.0 && secs <= 3600.0) {
                        return Err(invalid(
                            &format!("{field}.{what}"),
                            "must be more than 0 and at most 3600 seconds",
                        ));
                    }
                }
            }
            if let Some(m) = p
                .model_limits
                .iter()
                .find(|m| m.limits.scope == LimitScope::Key)
            {
                return Err(invalid(
                    &format!("providers.{name}.model_limits[{}].scope", m.model),
                    "cannot be `key`: a model's limits are its own; put the key's limit in the provider's `rate_limit` with scope = \"key\"",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let s: Settings = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        s.validate().unwrap();
        assert!(
            !format!("{s:?}").contains("sk-mock-local-key"),
            "secrets must not print"
        );
    }

    #[test]
    fn invalid_value_names_the_field_and_variable() {
        let mut s: Settings = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        s.worker.concurrency = 0;
        let msg = s.validate().unwrap_err().to_string();
        assert!(
            msg.contains("worker.concurrency") && msg.contains("LLMQ_WORKER__CONCURRENCY"),
            "{msg}"
        );
    }

    #[test]
    fn limits_that_cannot_work_are_refused_with_their_name() {
        let base: Settings = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        let with = |f: &dyn Fn(&mut RateLimitSettings)| {
            let mut s = base.clone();
            let mut l = RateLimitSettings {
                rpm: Some(600),
                ..Default::default()
            };
            f(&mut l);
            s.providers.get_mut("openai").unwrap().rate_limit = Some(l);
            s.validate().err().map(|e| e.to_string())
        };
        assert_eq!(with(&|_| {}), None);
        for (bad, field) in [
            (
                &(|l: &mut RateLimitSettings| l.token_burst_secs = f64::INFINITY)
                    as &dyn Fn(&mut RateLimitSettings),
                "token_burst_secs",
            ),
            (&|l| l.request_burst_secs = f64::NAN, "request_burst_secs"),
            (&|l| l.tpm = Some(u64::MAX), "tpm"),
            (&|l| l.max_concurrent = Some(0), "max_concurrent"),
        ] {
            let msg = with(bad).expect("refused");
            assert!(msg.contains(field), "{msg}");
        }
        let mut s = base.clone();
        s.providers.get_mut("openai").unwrap().model_limits = vec![ModelRateLimit {
            model: "gpt-4o".into(),
            limits: RateLimitSettings {
                scope: LimitScope::Key,
                ..Default::default()
            },
        }];
        let msg = s.validate().unwrap_err().to_string();
        assert!(msg.contains("model_limits[gpt-4o].scope"), "{msg}");
    }
}
