from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chatapp"
    verbose_name = "Chat"

    def ready(self) -> None:
        from chatapp.presence_events import broadcast_presence_change
        from presence.signals import presence_changed

        presence_changed.connect(broadcast_presence_change, dispatch_uid="chatapp.broadcast_presence_change")
