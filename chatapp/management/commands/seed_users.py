from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = (
        "Create users PREFIX1..PREFIXN with one password, for load tests and demos. "
        "Users that already exist are left as they are."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--count", type=int, required=True, help="Number of users to ensure exist.")
        parser.add_argument("--prefix", default="user", help="Username prefix; a number from 1 is appended (default: user).")
        parser.add_argument("--password", required=True, help="Password of every created user.")

    def handle(self, *args, count: int, prefix: str, password: str, **options) -> None:
        if count < 1:
            raise CommandError(f"--count must be at least 1, got {count}.")
        if not prefix:
            raise CommandError("--prefix must not be empty.")

        user_model = get_user_model()
        usernames = [f"{prefix}{number}" for number in range(1, count + 1)]
        existing = set(user_model.objects.filter(username__in=usernames).values_list("username", flat=True))
        # One hash for all: hashing is deliberately slow, and every user gets the same password.
        password_hash = make_password(password)
        new_users = [
            user_model(username=username, password=password_hash) for username in usernames if username not in existing
        ]
        user_model.objects.bulk_create(new_users, batch_size=1000, ignore_conflicts=True)
        self.stdout.write(f"Created {len(new_users)} users, {len(existing)} already existed ({prefix}1..{prefix}{count}).")
