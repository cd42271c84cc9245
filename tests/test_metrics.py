from __future__ import annotations

import re

import pytest

from chatapp.services import message_create

pytestmark = pytest.mark.django_db


def metric_value(content: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", content, re.M)
    assert match, f"{name} not in /metrics"
    return float(match[1])


def test_metrics_served_without_login(client):
    response = client.get("/metrics")

    content = response.content.decode()
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    for name in (
        "chat_sockets_open",
        "chat_messages_posted_total",
        "chat_deliveries_total",
        "chat_gap_fills_total",
        "chat_replayed_messages_total",
        "chat_delivery_latency_seconds_bucket",
        "presence_connections_tracked",
        "presence_users_reaped_total",
    ):
        assert name in content


def test_posted_messages_counted(client, room, alice):
    before = metric_value(client.get("/metrics").content.decode(), "chat_messages_posted_total")

    message_create(room=room, author=alice, body="one")
    message_create(room=room, author=alice, body="two")
    message_create(room=room, author=alice, body="two", client_id=None)

    after = metric_value(client.get("/metrics").content.decode(), "chat_messages_posted_total")
    assert after - before == 3
