"""The Extensions tab: list, enable/disable (after restart), check for updates, update, install
from a git URL.

The tab only renders and forwards: the work lives in `webui.extensions.install` (git, pip,
install.py) and `ExtensionManager` (what is loaded, `set_enabled`). Installing and updating run
code from the internet, so they are refused while the server is reachable beyond this computer
unless started with --enable-insecure-extension-access.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from webui.extensions import install
from webui.extensions.manager import Status
from webui.guard import same_origin
from webui.ui.messages import user_error

if TYPE_CHECKING:
    from webui.config import Config
    from webui.extensions.manager import Extension, ExtensionManager

HEADERS = ["name", "version", "source", "enabled", "status", "updates"]
NOT_FROM_THIS_PAGE = ("Installing and updating extensions run code, so they are done only from this server's own "
                      "page: this request did not come from it.")
COLUMN_WIDTHS = ["16%", "9%", "33%", "9%", "23%", "10%"]  # headers fit on one line (see PAGE_CSS too)


def _rows(manager: ExtensionManager, updates: dict[str, str], installed: list[str]) -> list[list[str]]:
    rows = [[e.name, e.version, e.source if e.path is None else f"{e.source}: {e.path}",
             "yes" if e.enabled else "no", _status(e, manager), updates.get(e.name, "")] for e in manager.extensions]
    rows += [[name, "", "folder", "yes", "installed: restart to load it", ""] for name in installed
             if manager.get(name) is None]
    return rows or [["", "", "", "", "no extensions found", ""]]


def _status(e: Extension, manager: ExtensionManager) -> str:
    if e.enabled and e.state is Status.DISABLED and not e.reason:  # disabled by the user, enabled again
        return "disabled: enabled again, restart to load it"
    if not e.enabled and e.active:
        return "loaded: disabled, restart to unload it"
    return manager.status_line(e)


def _from_this_page(request: gr.Request | None) -> None:
    """Installing and updating run code: only a request from this server's own page may do it
    (see webui.guard); a script or another site's page is refused."""
    headers = {k.lower(): v for k, v in dict(getattr(request, "headers", None) or {}).items()}
    if not same_origin(headers):
        raise user_error(NOT_FROM_THIS_PAGE)


def _updatable(manager: ExtensionManager) -> list[str]:
    return [e.name for e in manager.extensions if e.path is not None and install.is_git_checkout(e.path)]


def build_extensions_tab(manager: ExtensionManager, config: Config) -> None:
    """The "Extensions" tab; call inside the page's `gr.Tabs()`."""
    allowed = install.install_allowed(exposed=config.exposed, insecure_access=config.enable_insecure_extension_access)
    install_folder: Path = manager.folders[-1]

    with gr.Tab("Extensions", id="extensions", elem_id="tab_extensions"):
        updates = gr.State({})
        installed = gr.State([])
        table = gr.Dataframe(value=_rows(manager, {}, []), headers=HEADERS, interactive=False, wrap=True,
                             column_widths=COLUMN_WIDTHS, label="Extensions", elem_id="extensions_table")
        with gr.Row():
            enabled = gr.CheckboxGroup(choices=[e.name for e in manager.extensions],
                                       value=[e.name for e in manager.extensions if e.enabled],
                                       label="Enabled extensions", elem_id="extensions_enabled", scale=4)
            apply = gr.Button("Apply (takes effect after restart)", variant="primary", elem_id="extensions_apply",
                              scale=1)
        with gr.Row():
            check = gr.Button("Check for updates", elem_id="extensions_check", scale=1)
            choice = gr.Dropdown(choices=_updatable(manager), value=None, label="Extension to update",
                                 elem_id="extensions_update_choice", scale=3)
            update = gr.Button("Update", elem_id="extensions_update", scale=1)
        with gr.Row():
            url = gr.Textbox(label="Install from URL", placeholder="https://github.com/user/extension.git",
                             info=None if allowed else install.REFUSED_WHEN_EXPOSED,
                             elem_id="extensions_install_url", scale=4)
            install_button = gr.Button("Install", variant="primary", elem_id="extensions_install", scale=1)
        result = gr.Markdown(elem_id="extensions_result")

    def apply_enabled(selected: list[str] | None, ups: dict[str, str], new: list[str]) -> tuple[Any, str]:
        chosen = set(selected or [])
        changed = []
        for e in list(manager.extensions):
            want = e.name in chosen
            if want != e.enabled:
                try:
                    manager.set_enabled(e.name, want)
                except (ValueError, OSError) as err:
                    raise user_error(f"{e.name}: {err}") from None
                changed.append(f"{'enabled' if want else 'disabled'} {e.name}")
        message = ("; ".join(changed).capitalize() + ". Restart to apply.") if changed else "No changes."
        gr.Info(message)
        return _rows(manager, ups, new), message

    def check_updates(ups: dict[str, str], new: list[str]) -> tuple[Any, dict[str, str], str]:
        ups = dict(ups)
        for e in manager.extensions:
            ups[e.name] = "installed package (update it with pip)" if e.path is None else install.check_for_updates(
                e.path)
        behind = [f"{name}: {state}" for name, state in ups.items() if state.startswith(("behind", "error"))]
        message = "Updates: " + "; ".join(behind) if behind else "Every git extension is up to date."
        return _rows(manager, ups, new), ups, message

    def update_one(name: str | None, ups: dict[str, str], new: list[str],
                   request: gr.Request) -> tuple[Any, dict[str, str], str]:
        _from_this_page(request)
        e = manager.get(name) if name else None
        if e is None or e.path is None:
            raise user_error("Choose an extension installed from git to update.")
        try:
            summary = install.update(e.path, allowed=allowed)
        except (PermissionError, ValueError) as err:
            raise user_error(str(err)) from None
        ups = {**ups, e.name: summary}
        gr.Info(f"{e.name}: {summary}")
        return _rows(manager, ups, new), ups, f"{e.name}: {summary}"

    def install_url(text: str, ups: dict[str, str], new: list[str],
                    request: gr.Request) -> tuple[Any, list[str], str, str]:
        _from_this_page(request)
        try:
            path = install.install_from_git(text or "", install_folder, allowed=allowed)
        except (PermissionError, ValueError) as err:
            raise user_error(str(err)) from None
        name = install.manifest_name(path)
        message = f"Installed {name}: restart to load it"
        gr.Info(message)
        new = [*new, name]
        return _rows(manager, ups, new), new, "", f"{message} ({path})"

    apply.click(apply_enabled, inputs=[enabled, updates, installed], outputs=[table, result],
                api_visibility="private")
    check.click(check_updates, inputs=[updates, installed], outputs=[table, updates, result],
                api_visibility="private", concurrency_limit=1)
    update.click(update_one, inputs=[choice, updates, installed], outputs=[table, updates, result],
                 api_visibility="private", concurrency_limit=1)
    # named (undocumented) so scripts and tests can drive it; it is refused under the same rule
    install_button.click(install_url, inputs=[url, updates, installed], outputs=[table, installed, url, result],
                         api_name="extensions_install", api_visibility="undocumented", concurrency_limit=1)
