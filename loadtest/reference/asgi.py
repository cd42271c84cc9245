"""ASGI entry point of the reference chat: `daphne loadtest.reference.asgi:application`."""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "loadtest.reference.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from loadtest.reference.consumers import ReferenceRoomConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter([path("ws/rooms/<slug:slug>/", ReferenceRoomConsumer.as_asgi())]),
    }
)
