"""Server memory under large uploads: queued img2img jobs whose init image is a large PNG that is
small on the wire (a flat colour compresses to a few hundred KB), against the real server over HTTP.
Finished jobs are kept for their clients (10 minutes by default), so what each one holds is what
the server holds. Baseline, in the same run: the server's RSS after the first such job.

    python bench/job_memory.py [--jobs 20] [--side 6000]

Run it alone (2-core machine: anything beside it skews the figures).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api import rss_kib, start_api_server  # noqa: E402  bench/ is not a package


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--side", type=int, default=6000, help="init image side in pixels (6000: 36 MP, 108 MB decoded)")
    a = ap.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from webui.testing.make_checkpoint import write_checkpoint

    buf = io.BytesIO()
    Image.new("RGB", (a.side, a.side), (40, 90, 160)).save(buf, format="PNG")
    upload = base64.b64encode(buf.getvalue()).decode()
    body = {"type": "img2img", "prompt": "x", "steps": 1, "width": 64, "height": 64, "init_images": [upload]}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_checkpoint(root / "models" / "Stable-diffusion" / "tiny.safetensors", "sd1", seed=1)
        proc, base = start_api_server(root)
        try:
            def run_job() -> None:
                job = requests.post(base + "/jobs", json=body, timeout=300).json()
                while requests.get(f"{base}/jobs/{job['id']}", timeout=60).json()["state"] in ("queued", "running"):
                    time.sleep(0.1)

            run_job()
            first = rss_kib(proc.pid)
            for _ in range(a.jobs - 1):
                run_job()
            last = rss_kib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(15)
    decoded = a.side * a.side * 3 / 2**20
    print(f"upload: {len(buf.getvalue()) / 2**10:.0f} KiB PNG, {a.side}x{a.side} ({decoded:.0f} MiB decoded)")
    print(f"server RSS after 1 job: {first[0] / 1024:.0f} MiB (peak {first[1] / 1024:.0f} MiB)")
    print(f"server RSS after {a.jobs} jobs, all still retained: {last[0] / 1024:.0f} MiB (peak {last[1] / 1024:.0f} MiB)")
    print(f"ratio after {a.jobs} / after 1: {last[0] / first[0]:.3f} current, {last[1] / first[1]:.3f} peak "
          f"(decoded inputs kept by finished jobs would add about {decoded * (a.jobs - 1):.0f} MiB)")


if __name__ == "__main__":
    main()
