from __future__ import annotations

import json

import pytest

from tests.support import free_port

pytestmark = pytest.mark.django_db


def test_healthz_needs_no_login(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert json.loads(response.content) == {"status": "ok"}


def test_readyz_ok_when_database_and_redis_answer(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert json.loads(response.content) == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


def test_readyz_unavailable_when_redis_is_down(client, settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"

    response = client.get("/readyz")

    assert response.status_code == 503
    assert json.loads(response.content) == {
        "status": "unavailable",
        "checks": {"database": "ok", "redis": "failed: ConnectionError"},
    }
