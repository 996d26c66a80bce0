"""Start the web server: engine, page, and the Gradio launch with the flags' options."""

from __future__ import annotations

import contextlib
import logging
import os

from webui.app import build_engine
from webui.config import Config
from webui.guard import BodyLimit, LoginGate, Policy, RequestGuard

log = logging.getLogger("webui")


def serve(config: Config, block: bool = True) -> None:
    # No telemetry or update checks: the app runs offline and says nothing about its user.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    engine = build_engine(config)
    log.info("%d checkpoint(s) in %s", len(engine.registry.checkpoints()), config.checkpoints_path)
    if config.nowebui:
        serve_api_only(engine, config)
        return
    from fastapi.middleware import Middleware

    from webui.ui.blocks import PAGE_CSS, build_ui  # gradio is imported only when serving the page

    demo = build_ui(engine)
    demo.queue(default_concurrency_limit=16)  # our job queue orders generations

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Uvicorn runs this before it accepts a connection: the API and extensions' routes exist
        # from the first request on (a client that waits for the page would otherwise meet 404s).
        if config.api:
            from webui.api.routes import attach

            attach(app, engine)
        engine.extensions.app_started(app)
        yield

    _, local_url, share_url = demo.launch(
        server_name=config.server_name,
        server_port=config.port,
        share=config.share,
        auth=list(config.gradio_auth) or None,
        inbrowser=config.autolaunch,
        prevent_thread_lock=True,
        show_error=True,
        quiet=True,  # Gradio's own lines name its launch() arguments; ours name our flags (below)
        allowed_paths=[str(config.outputs_path.resolve())],
        footer_links=["api", "settings"],
        css=PAGE_CSS,
        # our /docs and /openapi.json describe /sdapi/v1 (and are behind --api-auth); the guard sits
        # in front of every route, Gradio's included
        app_kwargs={"docs_url": None, "redoc_url": None, "openapi_url": None,
                    "middleware": guards(config, Middleware), "lifespan": lifespan},
        run_history=False,  # a page of past runs we do not need (and one more route to guard)
        **_extension_assets(engine),
    )
    if config.api:
        log.info("HTTP API at %s/sdapi/v1 (docs at %s/docs)", local_url.rstrip("/"), local_url.rstrip("/"))
    # After the page is up: hash new checkpoints, import the model stack.
    engine.registry.hash_missing_in_background()
    engine.warm_up()
    print(startup_message(config, local_url, share_url), flush=True)
    if block:
        try:
            demo.block_thread()
        except KeyboardInterrupt:
            pass
        finally:
            demo.close()


def guards(config: Config, middleware: type) -> list:
    """What stands in front of every route, outermost first (see webui.guard)."""
    policy = Policy.build(listen=config.listen, share=config.share, allowed_hosts=config.allowed_hosts,
                          cors_origins=config.cors_allow_origins)
    stack = [middleware(RequestGuard, policy=policy), middleware(BodyLimit, limit=config.max_body_mb * 2**20)]
    if config.gradio_auth:
        stack.append(middleware(LoginGate))
    return stack


def startup_message(config: Config, local_url: str, share_url: str | None) -> str:
    """What the console says once the page is up, in terms of our flags."""
    lines = [f"Running on local URL:  {local_url}"]
    if share_url:
        lines.append(f"Running on public URL: {share_url} (temporary; anyone with the link can use this UI)")
    elif config.share:
        lines.append("Public link not created: Gradio's share tunnel could not be reached (no internet access, "
                     f"or the tunnel service refused). The local server keeps running at {local_url}")
    else:
        lines.append("To create a temporary public link, start with --share.")
    return "\n".join(lines)


def serve_api_only(engine, config: Config) -> None:
    """--nowebui: the HTTP API alone, on uvicorn, without the page."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.middleware import Middleware

    from webui.api.routes import attach

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, middleware=guards(config, Middleware))
    attach(app, engine)
    engine.extensions.app_started(app)
    engine.registry.hash_missing_in_background()
    engine.warm_up()
    print(f"HTTP API at http://{config.server_name}:{config.port}/sdapi/v1", flush=True)
    uvicorn.run(app, host=config.server_name, port=config.port, log_level="warning")


def _extension_assets(engine) -> dict:
    """Extensions' `javascript/*.js` (inlined into the page head) and `style.css` files."""
    js, css = engine.extensions.assets()
    scripts = "".join(f"<script>/* {p.parent.parent.name}/{p.name} */\n{p.read_text(encoding='utf-8')}\n</script>"
                      for p in js)
    return {"head": scripts or None, "css_paths": [str(p) for p in css] or None}
