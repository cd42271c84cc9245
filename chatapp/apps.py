from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chatapp"
    verbose_name = "Chat"
