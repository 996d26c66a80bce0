"""Shared fixtures: tiny random-weight checkpoints in the original layout, an engine over them,
and a real server process on a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from webui.testing.make_checkpoint import write_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def checkpoint_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One copy of each tiny checkpoint, made once per test session."""
    root = tmp_path_factory.mktemp("store")
    write_checkpoint(root / "sd1.safetensors", "sd1", seed=1)
    write_checkpoint(root / "sd1-other.safetensors", "sd1", seed=2)
    write_checkpoint(root / "sd2.safetensors", "sd2", seed=3)
    write_checkpoint(root / "sdxl.safetensors", "sdxl", seed=4)
    write_checkpoint(root / "sd1-inpaint.safetensors", "sd1-inpaint", seed=5)
    write_checkpoint(root / "sd1.ckpt", "sd1", seed=1)
    return root


@pytest.fixture
def data_dir(tmp_path: Path, checkpoint_store: Path) -> Path:
    """A data dir whose models/Stable-diffusion holds the tiny SD1 and SD2 checkpoints."""
    ckpts = tmp_path / "models" / "Stable-diffusion"
    ckpts.mkdir(parents=True)
    (tmp_path / "models" / "VAE").mkdir()
    for name in ("sd1.safetensors", "sd2.safetensors"):
        shutil.copy(checkpoint_store / name, ckpts / name)
    return tmp_path


def add_checkpoint(data_dir: Path, store: Path, name: str, as_name: str | None = None) -> Path:
    target = data_dir / "models" / "Stable-diffusion" / (as_name or name)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(store / name, target)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    data_dir: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(data_dir: Path, *args: str, timeout: float = 90, ready: str = "/",
                 python_path: Path | None = None, first_answer_ready: bool = False) -> Server:
    """Start `python -m webui` and wait until `ready` answers (200, or 401 behind auth).
    `python_path`: a folder put first on the server's PYTHONPATH (a stand-in a test provides).
    `first_answer_ready`: poll `ready` tightly and fail unless the very first answer is 200/401."""
    port = free_port()
    log = data_dir / f"server-{port}.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    if python_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(python_path), env.get("PYTHONPATH", "")) if p)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "webui", "--data-dir", str(data_dir), "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=data_dir,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log, data_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()}")
        try:
            answer = requests.get(server.url + ready, timeout=2)
        except requests.RequestException:
            time.sleep(0.01 if first_answer_ready else 0.2)
            continue
        if answer.status_code in (200, 401):
            return server
        if first_answer_ready:
            stop_server(server)
            raise AssertionError(f"the first answer on {ready} was {answer.status_code}: {answer.text[:200]}")
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"server did not start in {timeout}s:\n{server.output()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, checkpoint_store: Path) -> Iterator[Server]:
    """A real server over the tiny SD1 checkpoint, shared by the HTTP and browser tests."""
    root = tmp_path_factory.mktemp("served")
    add_checkpoint(root, checkpoint_store, "sd1.safetensors")
    s = start_server(root)
    yield s
    stop_server(s)
