"""Prometheus metrics of one node, served at /metrics."""
from __future__ import annotations

from django.contrib.auth.decorators import login_not_required
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

SOCKETS_OPEN = Gauge("chat_sockets_open", "WebSocket connections open on this node.")
MESSAGES_POSTED = Counter("chat_messages_posted_total", "Messages stored by this node.")
DELIVERIES = Counter("chat_deliveries_total", "Live message frames sent to sockets.")
GAP_FILLS = Counter("chat_gap_fills_total", "Messages the hub read from the database to fill a gap.")
REPLAYED = Counter("chat_replayed_messages_total", "Messages sockets replayed from the database after connecting.")
HANDSHAKES_SHED = Counter(
    "chat_handshakes_shed_total", "Sockets closed with 4503 because too many handshakes were in progress."
)
REJECTED_FRAMES = Counter("chat_rejected_frames_total", "Client frames answered with an error.", ["code"])
DELIVERY_LATENCY = Histogram(
    "chat_delivery_latency_seconds",
    "Time from a message's commit to the hub handing its frame to this node's sockets.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


@login_not_required
def metrics_view(request: HttpRequest) -> HttpResponse:
    # NOTE: served without login like /healthz; keep /metrics off the public
    # load balancer (the nginx config in deploy/ does not hide it).
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
