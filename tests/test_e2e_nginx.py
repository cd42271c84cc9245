"""The compose file's nginx config, run by Debian's nginx in front of two local app nodes."""
from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.cluster import FollowingClient
from tests.support import REPO_ROOT, DaphneNode, SocketClient, free_port, running_daphne

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

NODE_ENV = {"CHAT_DRAIN_TIMEOUT": "5", "PRESENCE_HEARTBEAT_INTERVAL": "0.5", "PRESENCE_TTL": "2"}


def local_nginx_config(work_dir: Path, listen_port: int, node_ports: list[int]) -> Path:
    """Rewrite deploy/nginx.conf for local nodes and wrap it in a minimal main config."""
    site = (REPO_ROOT / "deploy" / "nginx.conf").read_text()
    site = re.sub(r"listen 80;", f"listen 127.0.0.1:{listen_port};", site)
    servers = "".join(f"    server 127.0.0.1:{port};\n" for port in node_ports)
    site, replaced = re.subn(r"(    server app\d:8000;\n)+", servers, site)
    assert replaced == 1, "deploy/nginx.conf no longer lists app1 and app2 as expected"
    config = work_dir / "nginx.conf"
    config.write_text(
        f"daemon off;\npid {work_dir}/nginx.pid;\nerror_log {work_dir}/error.log;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"  access_log {work_dir}/access.log;\n"
        f"  client_body_temp_path {work_dir}/body;\n  proxy_temp_path {work_dir}/proxy;\n"
        f"  fastcgi_temp_path {work_dir}/fastcgi;\n  uwsgi_temp_path {work_dir}/uwsgi;\n  scgi_temp_path {work_dir}/scgi;\n"
        f"{site}\n}}\n"
    )
    return config


@contextmanager
def running_nginx(work_dir: Path, node_ports: list[int]):
    port = free_port()
    config = local_nginx_config(work_dir, port, node_ports)
    process = subprocess.Popen(["/usr/sbin/nginx", "-c", str(config), "-p", str(work_dir)])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                subprocess.run(["curl", "-fsS", f"http://127.0.0.1:{port}/healthz"], check=True, capture_output=True)
                break
            except subprocess.CalledProcessError:
                time.sleep(0.1)
        # The front looks like a node to the clients.
        yield DaphneNode(port=port, process=process, log_path=work_dir / "error.log")
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path):
    with ExitStack() as stack:
        nodes = [stack.enter_context(running_daphne(tmp_path, NODE_ENV, server="node")) for _ in range(2)]
        front = stack.enter_context(running_nginx(tmp_path, [node.port for node in nodes]))
        yield front, nodes


async def test_chat_through_nginx(cluster, room, make_user, cookie_for):
    from channels.db import database_sync_to_async

    front, _ = cluster
    users = [await database_sync_to_async(make_user)(f"viaproxy{number}") for number in range(4)]
    sockets = [await SocketClient.connect(front, room.slug, await cookie_for(user), after=0) for user in users]
    await asyncio.sleep(0.3)

    for number, socket in enumerate(sockets * 5):
        await socket.send(f"through nginx {number}", f"proxy-{number}")
    for socket in sockets:
        await socket.wait_for(lambda client: len(client.messages) >= 20)

    for socket in sockets:
        assert socket.seqs() == list(range(1, 21))
        assert socket.online == {user.username for user in users}
        await socket.close()


async def test_drained_node_clients_come_back_through_nginx(cluster, room, alice, make_user, cookie_for):
    from channels.db import database_sync_to_async

    from chatapp.services import message_create

    front, nodes = cluster
    users = [await database_sync_to_async(make_user)(f"behindproxy{number}") for number in range(6)]
    followers = [FollowingClient([front], room.slug, await cookie_for(user)) for user in users]
    for follower in followers:
        await follower.start()
    await asyncio.sleep(0.5)

    async def post_steadily(count: int) -> None:
        for number in range(count):
            await database_sync_to_async(message_create)(room=room, author=alice, body=f"steady {number}")
            await asyncio.sleep(0.05)

    posting = asyncio.ensure_future(post_steadily(50))
    await asyncio.sleep(0.8)
    await asyncio.to_thread(nodes[0].kill, signal.SIGTERM)
    await posting

    for follower in followers:
        deadline = time.monotonic() + 15
        while len(follower.all_seqs()) < 50 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert follower.all_seqs() == list(range(1, 51))
    assert any(1012 in follower.close_codes for follower in followers)
    for follower in followers:
        await follower.stop()
