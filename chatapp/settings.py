"""Settings for the chat server, read from the environment.

DATABASE_URL unset selects an SQLite file and REDIS_URL unset selects the
in-memory channel layer, so that a bare machine can serve the app in one
process. Production, the tests and the benchmarks set both.
"""
from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={value!r} is not a number.") from exc


DEBUG = env_flag("DEBUG")

SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set SECRET_KEY, or set DEBUG=1 for a local development server."
        )
    SECRET_KEY = "insecure-development-key-only-used-when-DEBUG-is-on"

ALLOWED_HOSTS = [
    host.strip()
    for host in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",")
    if host.strip()
]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_htmx",
    "chatapp",
    "presence",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "csp.middleware.CSPMiddleware",
]

# Scripts and styles load only from this origin, never inline, so injected
# markup cannot run. 'self' in connect-src covers the page's own ws:// and wss://.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "frame-ancestors": ["'none'"],
        "form-action": ["'self'"],
        "base-uri": ["'none'"],
        "object-src": ["'none'"],
    }
}

# HTTPS=1 when clients reach the site over TLS (usually terminated by the load
# balancer, which sets X-Forwarded-Proto). It turns on the settings that
# `manage.py check --deploy` requires.
HTTPS = env_flag("HTTPS")
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", "31536000"))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_flag("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_flag("SECURE_HSTS_PRELOAD", True)
    # /healthz, /readyz and /metrics respond over plain HTTP so that load
# balancers and scrapers can probe nodes directly.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]

ROOT_URLCONF = "chatapp.urls"
ASGI_APPLICATION = "chatapp.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=60,
        # No health check: Channels resets it before every database call, so
        # it would add a `SELECT 1` to each query of a socket's connect and
        # posts. After a failed query Django closes the connection, and the
        # next call opens a fresh one.
        conn_health_checks=False,
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "")
# Prefix of every Redis key and pub/sub channel the layer uses, so that test
# runs and several deployments can share one Redis server.
CHANNEL_PREFIX = os.environ.get("CHANNEL_PREFIX", "chat")

# Pub/sub traffic can be spread over several Redis servers: channels-redis
# assigns each group to one of them by a consistent hash of its name.
CHANNEL_REDIS_URLS = [url.strip() for url in os.environ.get("CHANNEL_REDIS_URLS", "").split(",") if url.strip()]

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": CHANNEL_REDIS_URLS or [REDIS_URL], "prefix": CHANNEL_PREFIX},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "room_list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Only needed for collectstatic: WhiteNoise serves straight from the finders,
# so daphne serves the pages without a collectstatic step.
STATIC_ROOT = os.environ.get("STATIC_ROOT") or None
WHITENOISE_USE_FINDERS = True

# Chat behaviour. Each value is documented in the README.
CHAT_MESSAGE_MAX_LENGTH = 4000
CHAT_PAGE_SIZE = 50
CHAT_REPLAY_PAGE_SIZE = int(os.environ.get("CHAT_REPLAY_PAGE_SIZE", "200"))
CHAT_GAP_CHECK_INTERVAL = env_float("CHAT_GAP_CHECK_INTERVAL", 1.0)

# Presence timings in seconds. The interval is how often each node refreshes
# its connections and reaps expired ones. The TTL is how long an unrefreshed
# connection stays listed, so a crashed node's users are reaped within TTL
# plus one interval. The grace is how long a closed connection stays listed,
# so that a quick reconnect shows no leave and join.
# Posting limit per user, shared by all nodes. It is a token bucket that
# refills at CHAT_RATE_LIMIT_PER_SECOND messages a second and contains at
# most CHAT_RATE_LIMIT_BURST messages.
CHAT_RATE_LIMIT_PER_SECOND = env_float("CHAT_RATE_LIMIT_PER_SECOND", 5.0)
CHAT_RATE_LIMIT_BURST = env_float("CHAT_RATE_LIMIT_BURST", 20.0)

# WebSocket handshakes one process works on at once (0: no maximum), and
# how many more may wait for a turn. Past both, a socket is closed with 4503
# (try again later) before any database query.
CHAT_MAX_CONCURRENT_HANDSHAKES = int(os.environ.get("CHAT_MAX_CONCURRENT_HANDSHAKES", "50"))
CHAT_MAX_QUEUED_HANDSHAKES = int(os.environ.get("CHAT_MAX_QUEUED_HANDSHAKES", "1000"))
# Seconds a room's presence changes are gathered into one frame; a change in a
# room quiet for longer goes out at once.
CHAT_PRESENCE_BATCH_INTERVAL = env_float("CHAT_PRESENCE_BATCH_INTERVAL", 1.0)
PRESENCE_HEARTBEAT_INTERVAL = env_float("PRESENCE_HEARTBEAT_INTERVAL", 5.0)
PRESENCE_TTL = env_float("PRESENCE_TTL", 15.0)
PRESENCE_LEAVE_GRACE = env_float("PRESENCE_LEAVE_GRACE", 3.0)
# Open sockets one user may hold in all rooms together; a further one is
# closed with 4429. 0 means no maximum.
PRESENCE_MAX_CONNECTIONS_PER_USER = int(os.environ.get("PRESENCE_MAX_CONNECTIONS_PER_USER", "20"))
PRESENCE_KEY_PREFIX = f"{CHANNEL_PREFIX}:presence"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
    },
}
