"""Render the HTML fragments that travel over the WebSocket.

A frame is an htmx out-of-band swap: its top element names the target by id,
so htmx's WebSocket extension and the page's own client module can both apply
it. A message is rendered once per message, never once per recipient.
"""
from __future__ import annotations

from collections.abc import Iterable

from django.template.loader import render_to_string

from chatapp.models import Message


def render_messages(messages: Iterable[Message]) -> str:
    """Render message elements without a wrapper, for pages and frames."""
    return render_to_string("chat/_messages.html", {"messages": messages}).strip()


def messages_frame(messages_html: str) -> str:
    """Wrap rendered message elements so that they append to #messages."""
    return f'<div id="messages" hx-swap-oob="beforeend">{messages_html}</div>'


def render_messages_frame(messages: Iterable[Message]) -> str:
    return messages_frame(render_messages(messages))


def render_error_frame(code: str, text: str, client_id: str | None = None) -> str:
    """Render the error fragment sent in reply to a rejected frame."""
    return render_to_string(
        "chat/_error_frame.html", {"code": code, "text": text, "client_id": client_id}
    ).strip()


def render_ack_frame(message: Message) -> str:
    """Render the acknowledgement that gives a sender the seq of its message."""
    return render_to_string("chat/_ack_frame.html", {"message": message}).strip()


def render_presence_list(online: dict[str, int]) -> str:
    """Render the frame that replaces the room's list of online users."""
    return render_to_string("chat/_presence_list_frame.html", {"users": list(online)}).strip()


def render_presence_changes(changes: list[tuple[str, bool]]) -> str:
    """Render the frame that adds users to or removes them from the online list; True means online."""
    return render_to_string("chat/_presence_change_frame.html", {"changes": changes}).strip()


def render_removal_frame(seq: int) -> str:
    """Render the frame after which a page shows a hidden message's placeholder."""
    return f'<div id="message-updates" hx-swap-oob="beforeend"><span hidden data-removed-seq="{int(seq)}"></span></div>'
