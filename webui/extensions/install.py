"""Install, check and update extensions that live in git repositories.

Owns: validating a git URL (https, http, ssh `git@host:path` / `ssh://`, `file://`; nothing that
git could read as an option or a remote helper such as `ext::`), cloning it into the user's
extensions folder, and honouring the extension's `requirements.txt` (`pip install -r`) and
`install.py` on install and on update only, never at start-up. Installing runs code from the
internet, so it is refused while the server is reachable beyond this computer unless the user
allowed it (`allowed`, computed by the caller from `--listen` / `--share` /
`--enable-insecure-extension-access`).

Every subprocess gets a list of arguments (no shell), a timeout, no terminal (git never prompts
for a password) and fails with a one-line `ValueError` naming the step and the end of its output.
No gradio here: the Extensions tab (`webui.ui.extensions_tab`) only calls these functions.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

MANIFEST = "extension.toml"
REQUIREMENTS = "requirements.txt"
INSTALL_SCRIPT = "install.py"

GIT_TIMEOUT_S = 300.0  # clone / fetch / pull
PIP_TIMEOUT_S = 900.0
INSTALL_SCRIPT_TIMEOUT_S = 600.0

REFUSED_WHEN_EXPOSED = (
    "Installing extensions is off while the server listens beyond this computer (--listen) or shares a "
    "public link (--share); start it with --enable-insecure-extension-access to allow it."
)

_SCP_URL = re.compile(r"^(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]*)@(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*):(?P<path>[^:].*)$")
_HOST = re.compile(r"^[A-Za-z0-9\[][A-Za-z0-9.:\[\]-]*$")
_lock = threading.Lock()  # one install / update at a time


def install_allowed(*, exposed: bool, insecure_access: bool) -> bool:
    """Whether the page may install or update extensions: always on this computer only,
    beyond it only with --enable-insecure-extension-access."""
    return not exposed or insecure_access


# --- URLs and names ----------------------------------------------------------------------------


def validate_url(url: str) -> str:
    """The URL, stripped, if it is one we clone from; ValueError saying why otherwise."""
    url = url.strip()
    if not url:
        raise ValueError("enter the URL of a git repository")
    if url.startswith("-"):
        raise ValueError(f"refused URL {url!r}: it starts with '-' (git would read it as an option)")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError(f"refused URL {url!r}: it contains spaces or control characters")
    if "::" in url.split("/", 1)[0] or url.lower().startswith("ext:"):
        raise ValueError(f"refused URL {url!r}: remote helpers (transport::address) are not allowed")
    scp = _SCP_URL.match(url)
    if scp and "://" not in url:
        if scp["path"].startswith("-"):
            raise ValueError(f"refused URL {url!r}: the path starts with '-'")
        return url
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("https", "http", "ssh"):
        host = parts.hostname or ""
        if not host or not _HOST.match(host) or (parts.netloc.rsplit("@", 1)[-1].startswith("-")):
            raise ValueError(f"refused URL {url!r}: no valid host name")
        if not parts.path.strip("/"):
            raise ValueError(f"refused URL {url!r}: no repository path")
        return url
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"refused URL {url!r}: a file URL needs an absolute path (file:///path/to/repo)")
        return url
    raise ValueError(f"refused URL {url!r}: use https://, http://, ssh (git@host:path or ssh://) or file:// URLs")


def folder_name(url: str) -> str:
    """The extension folder a URL installs into: its last path segment without `.git`, reduced
    to letters, digits, `.`, `_` and `-`."""
    scp = _SCP_URL.match(url)
    path = scp["path"] if scp and "://" not in url else unquote(urlsplit(url).path)
    last = path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if last.lower().endswith(".git"):
        last = last[:-4]
    return sanitise_name(last)


def sanitise_name(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    if not clean:
        raise ValueError(f"cannot make a folder name out of {name!r}; give a name")
    return clean[:100]


# --- subprocesses ------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["GIT_TERMINAL_PROMPT"] = "0"  # never wait for a password on a terminal nobody sees
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    env["GIT_ALLOW_PROTOCOL"] = "file:http:https:ssh"  # also for anything git fetches on its own
    env["PIP_NO_INPUT"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _tail(output: str, lines: int = 6, chars: int = 600) -> str:
    kept = [line.strip() for line in output.splitlines() if line.strip()][-lines:]
    text = " | ".join(kept)
    return ("…" + text[-chars:]) if len(text) > chars else text or "no output"


def _run(args: list[str], what: str, *, cwd: Path | None = None, timeout: float) -> str:
    """Run `args`; its combined output, or ValueError('<what> failed ...: <tail>')."""
    try:
        done = subprocess.run(args, cwd=cwd, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace", timeout=timeout, check=False)
    except FileNotFoundError:
        raise ValueError(f"{what} failed: {args[0]} is not installed or not on PATH") from None
    except subprocess.TimeoutExpired as e:
        out = e.output.decode(errors="replace") if isinstance(e.output, bytes) else (e.output or "")
        raise ValueError(f"{what} timed out after {timeout:g}s: {_tail(out)}") from None
    if done.returncode != 0:
        raise ValueError(f"{what} failed (exit code {done.returncode}): {_tail(done.stdout)}")
    return done.stdout


def _git(path: Path, *args: str, what: str, timeout: float = GIT_TIMEOUT_S) -> str:
    return _run(["git", "-C", str(path), *args], what, timeout=timeout).strip()


def _has_requirements(path: Path) -> bool:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return False
    return any(line.strip() and not line.strip().startswith("#") for line in lines)


def honour_install_files(folder: Path, *, requirements: bool = True, script: bool = True) -> list[str]:
    """`pip install -r requirements.txt` (skipped when it lists nothing), then `python install.py`
    in the extension folder. Returns what was run; ValueError with the output's tail on failure."""
    done: list[str] = []
    req = folder / REQUIREMENTS
    if requirements and req.is_file() and _has_requirements(req):
        _run([sys.executable, "-m", "pip", "install", "-r", str(req)], f"{folder.name}: pip install -r {REQUIREMENTS}",
             cwd=folder, timeout=PIP_TIMEOUT_S)
        done.append(REQUIREMENTS)
    if script and (folder / INSTALL_SCRIPT).is_file():
        _run([sys.executable, INSTALL_SCRIPT], f"{folder.name}: {INSTALL_SCRIPT}", cwd=folder,
             timeout=INSTALL_SCRIPT_TIMEOUT_S)
        done.append(INSTALL_SCRIPT)
    return done


def _check_manifest(folder: Path) -> None:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"not an extension: the repository has no {MANIFEST} at its top level")
    try:
        tomllib.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"not an extension: {MANIFEST} is unreadable: {e}") from None


def manifest_name(folder: Path) -> str:
    """The name an extension folder declares (its folder name when the manifest has none)."""
    try:
        data = tomllib.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return str(data.get("name") or folder.name)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return folder.name


# --- install / check / update ------------------------------------------------------------------


def install_from_git(url: str, folder: Path, *, allowed: bool, name: str | None = None) -> Path:
    """Clone `url` into `folder/<name>` and honour its requirements.txt and install.py.

    `name` defaults to the URL's last path segment. The clone is made under a hidden temporary
    name (which the loader skips) and moved into place once it proves to be an extension; if
    any step fails nothing is left behind. Returns the new extension folder; it loads on the
    next start. PermissionError when not `allowed`; ValueError (one line) for everything else."""
    if not allowed:
        raise PermissionError(REFUSED_WHEN_EXPOSED)
    url = validate_url(url)
    target_name = sanitise_name(name) if name else folder_name(url)
    target = folder / target_name
    with _lock:
        if target.exists():
            raise ValueError(f"an extension folder named {target_name!r} already exists in {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".installing-{target_name}-{uuid.uuid4().hex[:8]}"
        try:
            _run(["git", "clone", "--depth", "1", "--", url, str(staging)], "git clone", timeout=GIT_TIMEOUT_S)
            _check_manifest(staging)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            honour_install_files(target)
        except BaseException as e:
            shutil.rmtree(target, ignore_errors=True)
            if isinstance(e, ValueError):
                raise ValueError(f"{e} (the extension was removed again)") from None
            raise
    return target


def is_git_checkout(path: Path) -> bool:
    """A folder that is itself the top of a git checkout (not merely inside one, like the
    extensions shipped in this app's own repository)."""
    return (path / ".git").exists()


def check_for_updates(path: Path) -> str:
    """"up to date", "behind by N commit(s)", "not a git checkout", or "error: <reason>"."""
    if not is_git_checkout(path):
        return "not a git checkout"
    try:
        _git(path, "fetch", "--quiet", what="git fetch")
        count = _git(path, "rev-list", "--count", "HEAD..@{u}", what="git rev-list")
    except ValueError as e:
        return f"error: {e}"
    try:
        behind = int(count.splitlines()[-1])
    except (ValueError, IndexError):
        return f"error: unexpected answer from git rev-list: {count[:200]!r}"
    return "up to date" if behind == 0 else f"behind by {behind} commit(s)"


def update(path: Path, *, allowed: bool = True) -> str:
    """`git pull --ff-only`; when requirements.txt or install.py changed, honour them again.

    Returns a one-line summary ("already up to date" or "updated abc1234 -> def5678 (N
    commit(s))..."); ValueError (one line) when it cannot; PermissionError when not `allowed`
    (an update runs new code just like an install)."""
    if not allowed:
        raise PermissionError(REFUSED_WHEN_EXPOSED.replace("Installing extensions", "Installing or updating extensions"))
    if not is_git_checkout(path):
        raise ValueError(f"{path.name} is not a git checkout; it cannot be updated from here")
    with _lock:
        before = _git(path, "rev-parse", "HEAD", what="git rev-parse")
        _git(path, "pull", "--ff-only", "--quiet", what="git pull --ff-only")
        after = _git(path, "rev-parse", "HEAD", what="git rev-parse")
        if before == after:
            return "already up to date"
        count = _git(path, "rev-list", "--count", f"{before}..{after}", what="git rev-list")
        changed = set(_git(path, "diff", "--name-only", before, after, "--", REQUIREMENTS, INSTALL_SCRIPT,
                           what="git diff").split())
        summary = f"updated {before[:7]} -> {after[:7]} ({count} commit(s))"
        if changed:
            ran = honour_install_files(path, requirements=REQUIREMENTS in changed, script=True)
            if ran:
                summary += "; ran " + ", ".join(ran)
        return summary + "; restart to load it"
