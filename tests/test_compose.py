"""Structure of compose.yaml and the nginx config; this machine has no container engine to run them."""
from __future__ import annotations

import re

import yaml

from tests.support import REPO_ROOT


def load_compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())


def test_compose_runs_stores_migration_two_nodes_and_nginx():
    services = load_compose()["services"]
    assert set(services) == {"postgres", "redis", "migrate", "app1", "app2", "nginx"}


def test_app_nodes_wait_for_migration():
    services = load_compose()["services"]
    for name in ("app1", "app2"):
        assert services[name]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert services["migrate"]["depends_on"]["redis"] == {"condition": "service_healthy"}


def test_app_nodes_share_postgres_and_redis():
    services = load_compose()["services"]
    for name in ("app1", "app2"):
        environment = services[name]["environment"]
        assert environment["DATABASE_URL"].startswith("postgres://")
        assert "@postgres:5432/" in environment["DATABASE_URL"]
        assert environment["REDIS_URL"] == "redis://redis:6379/0"


def test_nginx_publishes_one_port_and_mounts_config():
    nginx = load_compose()["services"]["nginx"]
    assert nginx["ports"] == ["8080:80"]
    assert nginx["volumes"] == ["./deploy/nginx.conf:/etc/nginx/conf.d/default.conf:ro"]


def test_nginx_config_upgrades_websockets_to_both_nodes():
    config = (REPO_ROOT / "deploy" / "nginx.conf").read_text()
    assert re.search(r"server app1:8000;\s+server app2:8000;", config)
    assert "proxy_http_version 1.1;" in config
    assert "proxy_set_header Upgrade $http_upgrade;" in config
    assert "proxy_set_header Connection $connection_upgrade;" in config


def test_app_nodes_drain_before_being_killed():
    services = load_compose()["services"]
    for name in ("app1", "app2"):
        assert services[name]["stop_grace_period"] == "15s"
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert 'CMD ["python", "-m", "chatapp.node"' in dockerfile
