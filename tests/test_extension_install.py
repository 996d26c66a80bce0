"""Installing extensions from git: a local repository installs through a `file://` URL (its
install.py runs, the next engine loads it and its hook shows in the output); refused while the
server is exposed; bad URLs and non-extensions refused with nothing left behind; check for
updates and update; the Extensions tab drives the same functions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import free_port, start_server, stop_server
from webui.app import build_engine
from webui.cli import build_parser, config_from_args
from webui.config import Config
from webui.extensions import install
from webui.extensions.install import REFUSED_WHEN_EXPOSED, check_for_updates, install_from_git, update
from webui.infotext import parse_infotext
from webui.pipeline.request import GenerationRequest

EXTENSION = '''
from webui.extensions.api import hookimpl


@hookimpl
def process_prompt(stage):
    stage.infotext["Installed"] = 1
'''

INSTALL_SCRIPT = '''
from pathlib import Path

Path("installed.marker").write_text(str(Path.cwd().name))
'''


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", *args],
                          check=True, capture_output=True, text=True).stdout


def make_repo(root: Path, name: str = "hello-ext", *, manifest: bool = True, requirements: str = "# nothing\n") -> Path:
    repo = root / "sources" / f"{name}.git"
    repo.mkdir(parents=True)
    subprocess.run(["git", "-c", "init.defaultBranch=main", "init", "-q", str(repo)], check=True)
    if manifest:
        (repo / "extension.toml").write_text(f'name = "{name}"\nversion = "0.1"\napi = "1"\n')
    (repo / "__init__.py").write_text(EXTENSION)
    (repo / "requirements.txt").write_text(requirements)
    (repo / "install.py").write_text(INSTALL_SCRIPT)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    return repo


def req() -> GenerationRequest:
    return GenerationRequest(prompt="a cube", steps=2, width=64, height=64, seed=1, sampler_name="Euler",
                             save_images=False)


def test_install_from_file_url_loads_on_next_start(data_dir: Path) -> None:
    repo = make_repo(data_dir)
    config = Config(data_dir=data_dir, dtype="float32")
    folder = config.extensions_path  # the manager's last folder: where the tab installs
    target = install_from_git(repo.as_uri(), folder, allowed=True)
    assert target == folder / "hello-ext"  # ".git" dropped from the folder name
    assert (target / "installed.marker").read_text() == "hello-ext"  # install.py ran in the extension folder
    assert not [p for p in folder.iterdir() if p.name.startswith(".installing")]

    engine = build_engine(config)
    assert engine.extensions.folders[-1] == folder
    assert engine.extensions.get("hello-ext").status == "loaded"
    result = engine.runner.generate(req())
    assert parse_infotext(result.infotexts[0])["Installed"] == "1"

    with pytest.raises(ValueError, match="already exists"):
        install_from_git(repo.as_uri(), folder, allowed=True)


def test_refused_when_exposed_and_nothing_cloned(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    folder = tmp_path / "extensions"
    for config in (Config(data_dir=tmp_path, listen=True), Config(data_dir=tmp_path, share=True)):
        allowed = install.install_allowed(exposed=config.exposed, insecure_access=config.enable_insecure_extension_access)
        with pytest.raises(PermissionError) as e:
            install_from_git(repo.as_uri(), folder, allowed=allowed)
        assert str(e.value) == REFUSED_WHEN_EXPOSED
    assert not folder.exists()
    with pytest.raises(PermissionError):
        update(repo, allowed=False)
    insecure = Config(data_dir=tmp_path, listen=True, enable_insecure_extension_access=True)
    assert install.install_allowed(exposed=insecure.exposed, insecure_access=insecure.enable_insecure_extension_access)


@pytest.mark.parametrize("url, reason", [
    ("-uhack", "starts with '-'"),
    ("--upload-pack=touch x", "starts with '-'"),
    ("ext::sh -c touch%20x", "spaces"),
    ("ext::sh", "remote helpers"),
    ("fd::3", "remote helpers"),
    ("/some/local/path", "use https://"),
    ("relative/path.git", "use https://"),
    ("ftp://example.com/x.git", "use https://"),
    ("https://-oProxyCommand=x/y.git", "host"),
    ("git@-oProxyCommand=x:y.git", "use https://"),
    ("file://relative/repo", "absolute path"),
    ("https://example.com/", "no repository path"),
    ("", "enter the URL"),
])
def test_bad_urls_are_refused(tmp_path: Path, url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        install_from_git(url, tmp_path / "extensions", allowed=True)
    assert not (tmp_path / "extensions").exists()
    assert not list(tmp_path.glob("**/x"))


def test_accepted_urls_and_folder_names() -> None:
    assert install.folder_name("https://github.com/user/sd-cool_Ext.git") == "sd-cool_Ext"
    assert install.folder_name("git@github.com:user/thing.git") == "thing"
    assert install.folder_name("ssh://git@host.example/user/Thing/") == "Thing"
    assert install.folder_name("file:///tmp/a%20b/my%20ext.git") == "my-ext"
    for unsafe in ("https://example.com/x/..git", "https://example.com/../", "https://h/x/%2E%2E"):
        with pytest.raises(ValueError, match="folder name"):
            install.folder_name(unsafe)
    for good in ("https://github.com/u/r", "http://h:8080/r.git", "git@github.com:u/r.git", "ssh://h/r",
                 "file:///abs/repo"):
        assert install.validate_url(good) == good


def test_repository_without_manifest_is_removed(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, "plain-repo", manifest=False)
    folder = tmp_path / "extensions"
    with pytest.raises(ValueError, match="extension.toml"):
        install_from_git(repo.as_uri(), folder, allowed=True)
    assert list(folder.iterdir()) == []


def test_failing_requirements_remove_the_extension(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip must not reach for the network in a test
    repo = make_repo(tmp_path, "needs-stuff", requirements="./no-such-local-project\n")
    folder = tmp_path / "extensions"
    with pytest.raises(ValueError, match=r"pip install -r requirements.txt failed .*removed again"):
        install_from_git(repo.as_uri(), folder, allowed=True)
    assert list(folder.iterdir()) == []


def test_missing_repository_gives_a_one_line_git_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="git clone failed") as e:
        install_from_git((tmp_path / "nope.git").as_uri(), tmp_path / "extensions", allowed=True)
    assert "\n" not in str(e.value)


def test_check_for_updates_and_update(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    folder = tmp_path / "extensions"
    target = install_from_git(repo.as_uri(), folder, allowed=True, name="renamed")
    assert target.name == "renamed"
    assert check_for_updates(target) == "up to date"
    assert check_for_updates(tmp_path) == "not a git checkout"
    assert update(target) == "already up to date"

    (repo / "feature.txt").write_text("new\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "second")
    assert check_for_updates(target) == "behind by 1 commit(s)"
    (target / "installed.marker").unlink()
    summary = update(target)
    assert summary.startswith("updated ") and "(1 commit(s))" in summary
    assert (target / "feature.txt").read_text() == "new\n"
    assert not (target / "installed.marker").exists()  # install.py did not change: not run again
    assert check_for_updates(target) == "up to date"

    (repo / "install.py").write_text(INSTALL_SCRIPT + "Path('again.marker').write_text('1')\n")
    git(repo, "commit", "-q", "-am", "third")
    assert "ran install.py" in update(target)
    assert (target / "again.marker").exists()

    git(target, "remote", "set-url", "origin", (tmp_path / "gone.git").as_uri())
    status = check_for_updates(target)
    assert status.startswith("error: git fetch failed") and "\n" not in status


def _client_install(url_base: str, text: str, origin: str | None = "same") -> str:
    """Call the install event as the page would (its own Origin), or with `origin` (None: none)."""
    from gradio_client import Client

    if origin == "same":
        origin = url_base.rstrip("/")
    client = Client(url_base, verbose=False, headers={"Origin": origin} if origin else None)
    try:
        client.predict(text, api_name="/extensions_install")
    except Exception as e:  # noqa: BLE001  gradio_client raises AppError carrying the gr.Error message
        return str(e)
    return "installed"


def test_tab_installs_locally_and_refuses_under_listen(tmp_path: Path) -> None:
    import gradio as gr

    from webui.extensions.manager import ExtensionManager
    from webui.ui.extensions_tab import build_extensions_tab

    repo = make_repo(tmp_path)
    folder = tmp_path / "extensions"
    manager = ExtensionManager([folder], tmp_path / "extensions.json", packages=False)
    manager.load()
    for config, expected in ((Config(data_dir=tmp_path, listen=True), REFUSED_WHEN_EXPOSED),
                             (Config(data_dir=tmp_path), "installed")):
        with gr.Blocks(analytics_enabled=False) as demo:
            with gr.Tabs():
                build_extensions_tab(manager, config)
        demo.queue()
        demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
        try:
            answer = _client_install(demo.local_url, repo.as_uri())
        finally:
            demo.close()
        assert expected in answer
        assert (folder / "hello-ext").exists() == (expected == "installed")
    assert (folder / "hello-ext" / "installed.marker").exists()


def test_real_server_with_listen_refuses_installs(data_dir: Path) -> None:
    repo = make_repo(data_dir)
    server = start_server(data_dir, "--listen")
    try:
        answer = _client_install(server.url, repo.as_uri())
    finally:
        stop_server(server)
    if "Cannot find a function" in answer:  # the page does not show the Extensions tab: same rule, same flags
        config = config_from_args(build_parser().parse_args(["--data-dir", str(data_dir), "--listen"]))
        allowed = install.install_allowed(exposed=config.exposed, insecure_access=config.enable_insecure_extension_access)
        with pytest.raises(PermissionError) as e:
            install_from_git(repo.as_uri(), config.extensions_path, allowed=allowed)
        answer = str(e.value)
    assert REFUSED_WHEN_EXPOSED in answer
    assert not (data_dir / "extensions" / "hello-ext").exists()
