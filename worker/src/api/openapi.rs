//! The OpenAPI document as this server serves it at `/openapi.json`.
//!
//! `openapi.json` (kept beside the code) describes the API with tenants configured and the
//! default limits. What a server enforces depends on its settings, and clients are
//! generated from what it serves, so the document is adjusted once at startup:
//! - the job limits (`max_tokens`, `max_attempts`, the number of messages) are this
//!   server's `limits`;
//! - without tenants the API authenticates nobody and refuses no tenant, so the document
//!   declares no security and no 401/403 answers (it would otherwise promise callers a
//!   check that does not happen).

use serde_json::Value;

use crate::settings::Settings;

/// The document with tenants configured and the default limits.
pub const SOURCE: &str = include_str!("openapi.json");

/// The document `settings` make true.
pub(crate) fn document(settings: &Settings) -> anyhow::Result<String> {
    let mut doc: Value = serde_json::from_str(SOURCE)
        .map_err(|e| anyhow::anyhow!("the built-in openapi.json does not parse: {e}"))?;
    let limits = &settings.limits;
    let job = "/components/schemas/CreateJob/properties";
    set(
        &mut doc,
        &format!("{job}/max_tokens/maximum"),
        limits.max_output_tokens.into(),
    )?;
    set(
        &mut doc,
        &format!("{job}/max_attempts/maximum"),
        limits.max_attempts.into(),
    )?;
    set(
        &mut doc,
        &format!("{job}/messages/maxItems"),
        limits.max_messages.into(),
    )?;
    if settings.api.tenants.is_empty() {
        open_mode(&mut doc);
    }
    serde_json::to_string(&doc).map_err(Into::into)
}

/// Sets the value at `pointer`, which must exist (a test keeps the source in step).
fn set(doc: &mut Value, pointer: &str, value: Value) -> anyhow::Result<()> {
    let slot = doc
        .pointer_mut(pointer)
        .ok_or_else(|| anyhow::anyhow!("openapi.json has no {pointer}"))?;
    *slot = value;
    Ok(())
}

/// No tenants: no security requirement, no scheme, no 401/403 answers.
fn open_mode(doc: &mut Value) {
    if let Some(root) = doc.as_object_mut() {
        root.remove("security");
    }
    if let Some(components) = doc
        .pointer_mut("/components")
        .and_then(Value::as_object_mut)
    {
        components.remove("securitySchemes");
        if let Some(responses) = components
            .get_mut("responses")
            .and_then(Value::as_object_mut)
        {
            responses.remove("Unauthorized");
            responses.remove("Forbidden");
        }
    }
    if let Some(paths) = doc.pointer_mut("/paths").and_then(Value::as_object_mut) {
        for item in paths.values_mut().filter_map(Value::as_object_mut) {
            for op in item.values_mut().filter_map(Value::as_object_mut) {
                op.remove("security");
                if let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) {
                    responses.remove("401");
                    responses.remove("403");
                }
            }
        }
    }
    if let Some(Value::String(d)) = doc.pointer_mut("/info/description") {
        d.push_str(" This server has no tenants configured: it is open, needs no token and takes the tenant from each request.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(tenants: bool) -> Settings {
        let mut s = Settings::defaults().expect("defaults");
        if tenants {
            s.api.tenants.insert("acme".into(), "0".repeat(64));
        }
        s.limits.max_output_tokens = 4096;
        s.limits.max_attempts = 7;
        s.limits.max_messages = 16;
        s
    }

    fn doc(tenants: bool) -> Value {
        serde_json::from_str(&document(&settings(tenants)).expect("document")).expect("JSON")
    }

    #[test]
    fn limits_are_this_servers() {
        let d = doc(true);
        let job = &d["components"]["schemas"]["CreateJob"]["properties"];
        assert_eq!(job["max_tokens"]["maximum"], 4096);
        assert_eq!(job["max_attempts"]["maximum"], 7);
        assert_eq!(job["messages"]["maxItems"], 16);
    }

    #[test]
    fn security_is_declared_only_with_tenants() {
        let with = doc(true);
        assert_eq!(with["security"], serde_json::json!([{"bearer": []}]));
        assert!(with["paths"]["/v1/jobs"]["post"]["responses"]
            .get("401")
            .is_some());
        let open = doc(false);
        assert!(open.get("security").is_none(), "open mode enforces none");
        assert!(open["components"].get("securitySchemes").is_none());
        let text = open.to_string();
        assert!(!text.contains("\"401\"") && !text.contains("\"403\""));
        assert!(!text.contains("#/components/responses/Unauthorized"));
        assert!(!text.contains("#/components/responses/Forbidden"));
    }
}
