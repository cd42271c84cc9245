"""Helpers the load tools share for the servers they start on 127.0.0.1 and for CPU accounting."""
from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(
    process: subprocess.Popen, base_url: str, log_path: Path, timeout: float = 30, name: str = "daphne"
) -> None:
    """Wait until the app's login page returns 200; stop the process and raise when it does not in time."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode} before serving requests. See {log_path}.")
        try:
            with opener.open(f"{base_url}/accounts/login/", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    stop_process(process, name)
    raise RuntimeError(f"Timed out after {timeout:.0f} s waiting for {name} on {base_url}. See {log_path}.")


def stop_process(process: subprocess.Popen, name: str) -> None:
    """Stop a process this tool started, by its PID: SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.warning("%s pid=%s ignored SIGTERM for 10 s; killing it", name, process.pid)
            process.kill()
            process.wait(timeout=10)
    logger.info("%s stopped pid=%s code=%s", name, process.pid, process.returncode)


def process_cpu_seconds(pid: int) -> float:
    """Return user plus system CPU time of a process, all threads, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of proc(5), counted from the pid.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
