from __future__ import annotations

from asgiref.sync import async_to_sync
from django import forms
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin

from chatapp.models import Message, Room
from chatapp.services import (
    MessageRejected,
    message_create,
    message_hide,
    message_validate,
    user_ban,
    user_mute,
    user_unmute,
)
from presence.store import online_now


class MessageAdminForm(forms.ModelForm):
    class Meta:
        model = Message
        fields = ["room", "author", "body"]

    def clean_body(self) -> str:
        try:
            body, _client_id = message_validate(self.cleaned_data.get("body"))
        except MessageRejected as exc:
            raise forms.ValidationError(exc.text, code=exc.code) from exc
        return body


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = ["slug", "title", "is_private", "is_archived", "last_seq", "created_by", "created_at"]
    list_filter = ["is_private", "is_archived"]
    search_fields = ["slug", "title"]
    filter_horizontal = ["members"]
    readonly_fields = ["last_seq", "online_users"]
    prepopulated_fields = {"slug": ["title"]}

    @admin.display(description="online now")
    def online_users(self, obj: Room) -> str:
        if obj.pk is None:
            return "-"
        online = async_to_sync(online_now)(obj.slug)
        return ", ".join(f"{user} ({count} connections)" for user, count in online.items()) or "nobody"


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["room", "seq", "author", "short_body", "created_at", "hidden_at"]
    list_filter = ["room", ("hidden_at", admin.EmptyFieldListFilter)]
    actions = ["hide_messages"]
    search_fields = ["body", "author__username"]
    list_select_related = ["room", "author"]
    form = MessageAdminForm
    readonly_fields = ["seq", "client_id", "created_at"]
    raw_id_fields = ["author"]

    @admin.action(description="Hide selected messages from every page")
    def hide_messages(self, request, queryset) -> None:
        hidden = sum(message_hide(message) for message in queryset)
        self.message_user(request, f"Hid {hidden} messages.")

    def has_delete_permission(self, request, obj=None) -> bool:
        # Deleting would leave a hole in the room's seq; hide instead.
        return False

    @admin.display(description="body")
    def short_body(self, obj: Message) -> str:
        return obj.body if len(obj.body) <= 80 else obj.body[:79] + "…"

    def get_readonly_fields(self, request, obj=None):
        # A stored message keeps its room and author; only its text can be edited.
        if obj is not None:
            return [*self.readonly_fields, "room", "author"]
        return self.readonly_fields

    def save_model(self, request, obj: Message, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        # New messages go through the posting service so that they get the
        # next seq under the room lock and a broadcast after commit.
        result = message_create(room=obj.room, author=obj.author, body=obj.body)
        obj.pk = result.message.pk
        obj.seq = result.message.seq
        obj.created_at = result.message.created_at


admin.site.unregister(get_user_model())


@admin.register(get_user_model())
class ChatUserAdmin(UserAdmin):
    """Django's user admin plus the chat's moderation actions."""

    actions = ["mute", "unmute", "ban"]

    @admin.action(description="Mute: can read, cannot post")
    def mute(self, request, queryset) -> None:
        for user in queryset:
            user_mute(user)
        self.message_user(request, f"Muted {queryset.count()} users.")

    @admin.action(description="Unmute")
    def unmute(self, request, queryset) -> None:
        for user in queryset:
            user_unmute(user)
        self.message_user(request, f"Unmuted {queryset.count()} users.")

    @admin.action(description="Ban: deactivate and close every socket now")
    def ban(self, request, queryset) -> None:
        for user in queryset:
            user_ban(user)
        self.message_user(request, f"Banned {queryset.count()} users.")
