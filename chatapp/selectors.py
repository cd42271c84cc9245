"""Read-only queries on rooms and messages. Every page is keyset-paginated by seq."""
from __future__ import annotations

from django.conf import settings
from django.db.models import Q, QuerySet

from chatapp.models import Message, Room


def rooms_visible_to(user) -> QuerySet[Room]:
    """Return the rooms the user may see: public ones, and private ones they belong to (staff see all)."""
    if user.is_staff:
        return Room.objects.all()
    return Room.objects.filter(Q(is_private=False) | Q(members=user)).distinct()


def messages_latest(room: Room, limit: int | None = None) -> list[Message]:
    """Return the newest `limit` messages of the room, oldest first."""
    limit = limit or settings.CHAT_PAGE_SIZE
    newest_first = Message.objects.filter(room=room).select_related("author").order_by("-seq")[:limit]
    return list(reversed(newest_first))


def messages_before(room: Room, before_seq: int, limit: int | None = None) -> list[Message]:
    """Return up to `limit` messages with seq below `before_seq`, oldest first."""
    limit = limit or settings.CHAT_PAGE_SIZE
    newest_first = (
        Message.objects.filter(room=room, seq__lt=before_seq)
        .select_related("author")
        .order_by("-seq")[:limit]
    )
    return list(reversed(newest_first))


def messages_after(room_id: int, after_seq: int, limit: int, up_to_seq: int | None = None) -> list[Message]:
    """Return up to `limit` messages with seq above `after_seq` (and at most `up_to_seq`), oldest first."""
    queryset = Message.objects.filter(room_id=room_id, seq__gt=after_seq)
    if up_to_seq is not None:
        queryset = queryset.filter(seq__lte=up_to_seq)
    return list(queryset.select_related("author").order_by("seq")[:limit])


def room_last_seq(room_id: int) -> int:
    return Room.objects.filter(pk=room_id).values_list("last_seq", flat=True).get()


def rooms_last_seq(room_ids: list[int]) -> dict[int, int]:
    return dict(Room.objects.filter(pk__in=room_ids).values_list("pk", "last_seq"))
