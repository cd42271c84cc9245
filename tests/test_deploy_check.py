"""Production settings pass Django's deployment checklist."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.support import REPO_ROOT


def run_check(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DEBUG": "0",
        "SECRET_KEY": "k3y-" + "x9Qz" * 16,
        "ALLOWED_HOSTS": "chat.example.com",
        **extra_env,
    }
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_https_settings_pass_deploy_check():
    result = run_check({"HTTPS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_plain_http_settings_fail_deploy_check():
    result = run_check({"HTTPS": "0"})
    assert result.returncode != 0
    assert "SECURE_SSL_REDIRECT" in result.stdout + result.stderr


def test_missing_secret_key_rejected():
    result = run_check({"SECRET_KEY": "", "HTTPS": "1"})
    assert result.returncode != 0
    assert "SECRET_KEY is not set. Set SECRET_KEY, or set DEBUG=1 for a local development server." in result.stderr
