#!/usr/bin/env python3
"""Install what is missing, then start the web UI (or run a command).

    python launch.py [flags]              serve the page on http://127.0.0.1:7860
    python launch.py txt2img --ckpt ...   generate from the command line
    python launch.py test [pytest args]   install test dependencies and run the test suite

torch is installed only when it is missing, never replaced: set TORCH_COMMAND to choose the
build, e.g. TORCH_COMMAND="torch==2.7.1 --index-url https://download.pytorch.org/whl/cu128"
(CUDA), ".../whl/rocm6.3" (ROCm) or ".../whl/cpu" (CPU). Default: "torch==2.13.0".
Include torchvision from the same index, as A1111 does (`torch==2.7.1 torchvision==0.22.1 --index-url
...`): spandrel, which loads the upscaler models, imports it, and its compiled ops must match torch.
Every install is pinned to the installed torch, so pip cannot replace it. A torchvision that cannot
be imported with this torch (PyPI's 0.28.0 with a CPU build of torch 2.13: "operator
torchvision::nms does not exist") would stop diffusers and transformers from importing, so it is
removed, with a message; upscalers then load through the built-in ESRGAN / Compact networks.
`--xformers` (or `--attention xformers`) also installs xformers when it is missing, on a CUDA
build of torch only, and pinned to the installed torch so pip cannot replace it; if no xformers
build fits that torch, the UI runs with PyTorch SDPA and says so.
Set SKIP_INSTALL=1 to skip every check.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_TORCH = "torch==2.13.0"
PROJECT = "sd-webui"
APP_EXTRAS = ("upscalers", "gguf")  # what a user of the launcher gets beyond the plain install (see pyproject.toml)


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    print("launch: " + " ".join(shlex.quote(a) for a in cmd), flush=True)
    subprocess.run(cmd, check=True)


def ensure_torch() -> None:
    try:
        md.version("torch")
        return
    except md.PackageNotFoundError:
        pass
    command = os.environ.get("TORCH_COMMAND", DEFAULT_TORCH).strip()
    args = shlex.split(command)
    if args[:2] == ["pip", "install"]:  # A1111 style: a whole pip command
        args = args[2:]
    pip(*args)


def _requirements(extras: tuple[str, ...]) -> list[str]:
    import tomllib  # 3.11+, checked in main()

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return reqs


def _satisfied(requirement: str) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
        try:
            md.version(name)
            return True
        except md.PackageNotFoundError:
            return False
    req = Requirement(requirement)
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        return False
    return req.specifier.contains(version, prereleases=True)


def ensure_project(extras: tuple[str, ...] = ()) -> None:
    """Install the project (editable) with `extras` if it or any of its requirements is missing."""
    ensure_torch()
    missing = [r for r in _requirements(extras) if not _satisfied(r)]
    # An egg-info folder in the checkout also answers to the name, so look at every match.
    installed_here = any(
        ROOT.as_uri() in (d.read_text("direct_url.json") or "") for d in md.distributions(name=PROJECT)
    )
    if missing or not installed_here:
        if missing:
            print(f"launch: installing missing requirements: {', '.join(missing)}", flush=True)
        target = f"{ROOT}[{','.join(extras)}]" if extras else str(ROOT)
        # torch is already present and pinned: a dependency (spandrel -> torchvision) cannot replace it
        with _torch_pin() as pins:
            pip("-e", target, "-c", pins)
        ensure_torchvision()  # only after an install: a start-up that installs nothing pays nothing


@contextlib.contextmanager
def _torch_pin() -> Iterator[str]:
    """A pip constraints file holding the installed torch's exact version."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
        pins.write(f"torch=={md.version('torch')}\n")
    try:
        yield pins.name
    finally:
        os.unlink(pins.name)


def ensure_torchvision() -> None:
    """An installed torchvision that cannot be imported with this torch is removed: it would make
    `import diffusers` fail. spandrel then stays unused and the app says why."""
    try:
        version = md.version("torchvision")
    except md.PackageNotFoundError:
        return
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], check=False, capture_output=True, text=True)
    if probe.returncode == 0:
        return
    lines = [line for line in probe.stderr.strip().splitlines() if line.strip()]
    reason = lines[-1] if lines else f"exit status {probe.returncode}"
    print(f"launch: torchvision {version} cannot be imported with torch {md.version('torch')} ({reason}); it would "
          "stop diffusers and transformers from importing, so it is removed. Upscalers load through the built-in "
          "ESRGAN / Compact networks; for every architecture (spandrel), install the torchvision built for your "
          "torch from the same index (TORCH_COMMAND, see the README).", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=True)


def wants_xformers(argv: list[str]) -> bool:
    return "--xformers" in argv or any(
        a == "--attention" and argv[i + 1:i + 2] == ["xformers"] or a == "--attention=xformers"
        for i, a in enumerate(argv))


def ensure_xformers() -> None:
    """xformers for a CUDA torch, never at the cost of replacing that torch."""
    try:
        md.version("xformers")
        return
    except md.PackageNotFoundError:
        pass
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                           capture_output=True, text=True)
    version, _, cuda = probe.stdout.strip().partition(" ")
    if probe.returncode != 0 or cuda in ("", "None"):
        print("launch: xformers needs a CUDA build of torch (this one is not); the UI will use PyTorch SDPA",
              flush=True)
        return
    try:
        with _torch_pin() as pins:  # pip may pick any xformers that fits this torch, or none
            pip("xformers", "-c", pins)
    except subprocess.CalledProcessError:
        print(f"launch: no xformers build fits torch {version}; the UI will use PyTorch SDPA", flush=True)


def ensure_chromium() -> None:
    """The browser tests drive Debian's Chromium; install it with apt where we can."""
    if shutil.which("chromium") or Path("/usr/bin/chromium").exists():
        return
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("launch: installing chromium (apt-get) for the browser tests", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, env=env)
    else:
        print("launch: chromium not found and cannot be installed here; browser tests will be skipped", flush=True)


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 11):
        print(f"error: Python 3.11 or newer is required (this is {sys.version.split()[0]})", file=sys.stderr)
        return 2
    skip = os.environ.get("SKIP_INSTALL") == "1"
    if argv[:1] == ["test"]:
        if not skip:
            ensure_project(extras=("test", *APP_EXTRAS))
            ensure_chromium()
        return subprocess.run([sys.executable, "-m", "pytest", *argv[1:]], cwd=ROOT).returncode
    if not skip:
        ensure_project(extras=APP_EXTRAS)
        if wants_xformers(argv):
            ensure_xformers()
    from webui.cli import main as webui_main

    return webui_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
