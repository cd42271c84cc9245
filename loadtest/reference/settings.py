"""Settings of the reference chat: the textbook Channels room, kept only to measure the product against.

No database, no sessions, no authentication: a socket joins its room's group
and every message is broadcast with group_send through channels-redis.
"""
import os

SECRET_KEY = os.environ.get("SECRET_KEY", "reference-chat-benchmark-only")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["daphne", "channels"]
ROOT_URLCONF = "loadtest.reference.urls"
ASGI_APPLICATION = "loadtest.reference.asgi.application"
DATABASES: dict = {}
USE_TZ = True
CHANNEL_LAYERS = {
    "default": {
        # The layer of the Channels tutorial's chat.
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": [os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")],
            "prefix": os.environ.get("CHANNEL_PREFIX", "chatreference"),
        },
    }
}
