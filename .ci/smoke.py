#!/usr/bin/env python3
"""CI: run the README's main command as a new user would, and check it serves.

    python .ci/smoke.py VENV_PYTHON

Starts `python launch.py --api --port P --data-dir D` with the given interpreter (a clean virtual
environment: launch.py installs what is missing first), waits for the page to answer 200, drops a
tiny checkpoint into D/models/Stable-diffusion, presses "refresh" over the API, asks for one
txt2img over the API and checks that a PNG comes back, then stops the server.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 1200  # the first start installs every dependency


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | None = None, timeout: float = 600) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def main(python: str) -> int:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="smoke-") as tmp:
        data = Path(tmp)
        started = time.monotonic()
        server = subprocess.Popen([python, str(ROOT / "launch.py"), "--api", "--port", str(port), "--data-dir", str(data)],
                                  cwd=ROOT, start_new_session=True)
        try:
            while True:
                if server.poll() is not None:
                    print(f"smoke: the server exited with {server.returncode} before serving", flush=True)
                    return 1
                try:
                    status, _ = call(base + "/", timeout=5)
                    if status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() - started > START_TIMEOUT_S:
                    print("smoke: the page did not answer in time", flush=True)
                    return 1
                time.sleep(1)
            print(f"smoke: the page answered 200 after {time.monotonic() - started:.0f} s", flush=True)
            ckpt = data / "models" / "Stable-diffusion" / "tiny.safetensors"
            subprocess.run([python, "-m", "webui.testing.make_checkpoint", str(ckpt)], check=True, cwd=data)
            status, body = call(base + "/sdapi/v1/refresh-checkpoints", {})
            assert status == 200, (status, body[:500])
            status, body = call(base + "/sdapi/v1/txt2img", {"prompt": "a lighthouse", "steps": 2, "width": 64,
                                                             "height": 64, "seed": 1})
            assert status == 200, (status, body[:500])
            image = base64.b64decode(json.loads(body)["images"][0])
            assert image.startswith(b"\x89PNG\r\n\x1a\n"), image[:16]
            print(f"smoke: txt2img over the API returned a {len(image)}-byte PNG", flush=True)
            return 0
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else sys.executable))
