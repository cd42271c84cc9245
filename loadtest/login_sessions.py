"""Logged-in sessions for load-test users, written straight into Django's session store.

Logging hundreds of users in over HTTP would spend the run on password hashing.
Call only after django.setup().
"""
from __future__ import annotations

from importlib import import_module

from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model

MODEL_BACKEND = "django.contrib.auth.backends.ModelBackend"


def session_keys(usernames: list[str]) -> list[str]:
    """Create one session per username, in order, and return their keys."""
    users = {user.username: user for user in get_user_model().objects.filter(username__in=usernames)}
    session_store = import_module(settings.SESSION_ENGINE).SessionStore
    keys = []
    for username in usernames:
        user = users[username]
        session = session_store()
        session[SESSION_KEY] = str(user.pk)
        session[BACKEND_SESSION_KEY] = MODEL_BACKEND
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.create()
        keys.append(session.session_key)
    return keys
