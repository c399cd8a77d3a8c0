#!/usr/bin/env bash
# Validates docker-compose.yml statically (there is no Docker engine on CI): the compose
# tool's own `config` check, then llmq-specific rules.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v docker-compose >/dev/null 2>&1; then
  docker-compose -f docker-compose.yml config -q
  echo "docker-compose config: ok ($(docker-compose version --short 2>/dev/null || echo unknown))"
elif docker compose version >/dev/null 2>&1; then
  docker compose -f docker-compose.yml config -q
  echo "docker compose config: ok"
else
  echo "no compose tool found: run LLMQ_WITH_COMPOSE=1 bash scripts/services.sh" >&2
  exit 1
fi

PY=python3
python3 -c 'import yaml' 2>/dev/null || PY=/usr/bin/python3
"$PY" - <<'PY'
import yaml
doc = yaml.safe_load(open("docker-compose.yml"))
svc = doc["services"]
need = ["rabbitmq", "redis", "postgres", "migrate", "api", "worker", "mock-provider"]
missing = [s for s in need if s not in svc]
assert not missing, f"missing services: {missing}"
w = svc["worker"]
assert "container_name" not in w and "ports" not in w, "worker must be scalable (no container_name/ports)"
assert w["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
for s in ["rabbitmq", "redis", "postgres", "api", "mock-provider"]:
    assert "healthcheck" in svc[s], f"{s} has no healthcheck"
r = svc["rabbitmq"]
assert r.get("hostname"), "rabbitmq needs a fixed hostname (its data directory is named after it)"
assert any(str(v).endswith(":/var/lib/rabbitmq") for v in r.get("volumes", [])), \
    "rabbitmq needs a volume on /var/lib/rabbitmq, or recreating it drops every queued message"
for name, s in svc.items():
    for p in s.get("ports", []):
        assert str(p).startswith("127.0.0.1:"), f"{name} publishes {p} on every interface"
print("llmq compose rules: ok")
PY
