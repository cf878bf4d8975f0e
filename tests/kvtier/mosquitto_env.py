"""A real mosquitto broker for the MQTT tests that run against a standalone broker (the
embedded amqtt broker covers the rest). Tests skip where mosquitto is not installed; CI
installs it (`.ci/run`)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SKIP_REASON = "mosquitto is not installed (apt-get install mosquitto)"


def mosquitto_exe() -> str | None:
    """The mosquitto binary (Debian puts it in /usr/sbin, often not on PATH), or None."""
    if exe := shutil.which("mosquitto"):
        return exe
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def running_mosquitto(exe: str, conf: Path, port: int) -> Iterator[None]:
    """mosquitto -c conf, once it listens on 127.0.0.1:port; terminated on exit."""
    proc = subprocess.Popen(
        [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(200):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None:
                pytest.fail(f"mosquitto exited with {proc.returncode}")
            time.sleep(0.01)  # a real process: nothing to wait on but its port
        yield
    finally:
        proc.terminate()
        proc.wait(5)
