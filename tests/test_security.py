"""The server under hostile input, probed over real HTTP: DNS rebinding (foreign Host / Origin) on
every route of the app's own route table, extension installs from another site, decompression
bombs and damaged images, oversized bodies, what a visitor sees before logging in, output folders
set from outside, and what finished jobs keep in memory."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.conftest import Server, add_checkpoint, start_server, stop_server

API = "/sdapi/v1"
FOREIGN = "attacker.example"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, checkpoint_store: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("guarded")
    add_checkpoint(root, checkpoint_store, "sd1.safetensors")
    s = start_server(root, "--api", "--max-body-mb", "2")
    yield s
    stop_server(s)


def route_table(data_dir: Path) -> list[tuple[str, str]]:
    """(method, path) of every route the served app has: the page's, Gradio's own and the API's,
    read from the app as the server builds it (so a route added later is probed too)."""
    import gradio as gr

    from webui.api.routes import attach
    from webui.app import build_engine
    from webui.config import Config
    from webui.ui.blocks import build_ui

    engine = build_engine(Config(data_dir=data_dir, api=True))
    demo = build_ui(engine)
    demo.queue()
    app = gr.routes.App.create_app(demo)
    attach(app, engine)


    def walk(routes) -> Iterator[tuple[set[str] | None, str]]:
        for route in routes:
            if hasattr(route, "effective_candidates"):  # FastAPI keeps an included router nested
                yield from walk(route.effective_candidates())
            elif hasattr(route, "original_route"):
                yield getattr(route.original_route, "methods", None), route.path
            elif getattr(route, "path", None):
                yield getattr(route, "methods", None), route.path

    out = []
    for methods, path in walk(app.routes):
        path = re.sub(r"\{[^}]+\}", "x", path)
        for method in sorted(methods or {"GET"}):  # a websocket route has no methods: probed with GET
            if method != "HEAD":
                out.append((method, path))
    return sorted(set(out))


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header claiming width x height, with a tiny (unfinished) pixel stream."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


# --- Host and Origin ---------------------------------------------------------------------------------


def test_every_route_refuses_a_foreign_host(served: Server) -> None:
    routes = route_table(served.data_dir)
    assert len(routes) > 40 and ("POST", API + "/txt2img") in routes and ("GET", "/") in routes
    for method, path in routes:
        r = requests.request(method, served.url + path, headers={"Host": FOREIGN}, timeout=30)
        assert r.status_code == 403, (method, path, r.status_code)
        assert "host" in r.json()["detail"]
    # the same requests with the server's own name are not refused by the guard
    for method, path in routes:
        if method == "GET":
            with requests.get(served.url + path, timeout=30, stream=True) as r:  # some are event streams
                # (Gradio's own file serving answers 403 for a path outside its folders: not the guard)
                assert r.status_code != 403 or "server's name" not in r.text, path


def test_state_changing_requests_from_another_site_are_refused(served: Server) -> None:
    routes = [(m, p) for m, p in route_table(served.data_dir) if m in ("POST", "PUT", "PATCH", "DELETE")]
    assert len(routes) > 20
    for headers in ({"Origin": "http://attacker.example"}, {"Origin": "null"},
                    {"Sec-Fetch-Site": "cross-site"}):
        for method, path in routes:
            r = requests.request(method, served.url + path, headers=headers, json={}, timeout=30)
            assert r.status_code == 403, (headers, method, path, r.status_code)
    # the page's own origin, and programs that send none, are served
    own = {"Origin": served.url}
    assert requests.post(served.url + API + "/png-info", json={"image": ""}, headers=own, timeout=30).status_code == 200
    assert requests.post(served.url + API + "/png-info", json={"image": ""}, timeout=30).status_code == 200
    # reading (GET) from another site's page is left to the browser's CORS rules
    assert requests.get(served.url + API + "/samplers", headers={"Origin": "http://x.example"},
                        timeout=30).status_code == 200


def test_a_rebinding_page_cannot_install_an_extension(served: Server, tmp_path: Path) -> None:
    from tests.test_extension_install import _client_install, make_repo

    repo = make_repo(tmp_path)
    installed = served.data_dir / "extensions" / "hello-ext"
    r = requests.post(served.url + "/gradio_api/call/extensions_install", json={"data": [repo.as_uri()]},
                      headers={"Host": f"{FOREIGN}:{served.url.rsplit(':', 1)[1]}"}, timeout=30)
    assert r.status_code == 403
    r = requests.post(served.url + "/gradio_api/call/extensions_install", json={"data": [repo.as_uri()]},
                      headers={"Origin": "http://attacker.example"}, timeout=30)
    assert r.status_code == 403
    # a program without the page's origin (not a browser on this page) is refused by the tab itself
    answer = _client_install(served.url, repo.as_uri(), origin=None)
    assert "only from this server's own page" in answer
    assert not installed.exists()


def test_allowed_hosts_flag_and_listen_names(tmp_path: Path, checkpoint_store: Path) -> None:
    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    s = start_server(tmp_path, "--nowebui", "--allowed-hosts", "sd.lan", ready=API + "/samplers")
    try:
        assert requests.get(s.url + API + "/samplers", headers={"Host": "sd.lan"}, timeout=30).status_code == 200
        assert requests.get(s.url + API + "/samplers", headers={"Host": "localhost"}, timeout=30).status_code == 200
        assert requests.get(s.url + API + "/samplers", headers={"Host": FOREIGN}, timeout=30).status_code == 403
    finally:
        stop_server(s)


def test_policy_names() -> None:
    from webui.guard import Policy, same_origin

    local = Policy.build(listen=False, share=False)
    assert local.host_allowed("127.0.0.1:7860") and local.host_allowed("localhost") and local.host_allowed("[::1]:80")
    assert not local.host_allowed("attacker.example:7860") and not local.host_allowed(None)
    assert not local.host_allowed("127.0.0.1.attacker.example")
    shared = Policy.build(listen=False, share=True)
    assert shared.host_allowed("abc123.gradio.live") and not local.host_allowed("abc123.gradio.live")
    assert Policy.build(listen=False, share=False, allowed_hosts=["*"]).host_allowed("anything")
    listening = Policy.build(listen=True, share=False)
    import socket

    assert listening.host_allowed(socket.gethostname())
    assert same_origin({"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:7860"})
    assert not same_origin({"host": "127.0.0.1:7860"})
    assert not same_origin({"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:7860", "sec-fetch-site": "cross-site"})
    assert local.refusal("POST", {"host": "localhost:1", "origin": "http://localhost:1"}) is None
    assert local.refusal("POST", {"host": "localhost:1", "origin": "http://localhost:2"}) is not None
    allowed = Policy.build(listen=False, share=False, cors_origins=["https://app.example"])
    assert allowed.refusal("POST", {"host": "localhost:1", "origin": "https://app.example"}) is None


# --- images and bodies -----------------------------------------------------------------------------------


IMAGE_ROUTES = {
    "/img2img": lambda data: {"prompt": "x", "steps": 1, "width": 64, "height": 64, "init_images": [data]},
    "/jobs": lambda data: {"type": "img2img", "steps": 1, "width": 64, "height": 64, "init_images": [data]},
    "/extra-single-image": lambda data: {"image": data, "upscaler_1": "Lanczos"},
    "/extra-batch-images": lambda data: {"imageList": [{"data": data, "name": "a"}], "upscaler_1": "Lanczos"},
    "/png-info": lambda data: {"image": data},
    "/interrogate": lambda data: {"image": data, "model": "clip"},
}


def test_bad_images_answer_4xx_on_every_image_route(served: Server) -> None:
    good = png(Image.new("RGB", (64, 64), (1, 2, 3)))
    cases = {
        "a decompression bomb": (b64(bomb_png()), "megapixels"),
        "a truncated PNG": (b64(good[: len(good) // 2]), "truncated"),
        "bytes that are no image": (b64(b"hello, this is text"), "not an image"),
        "not base64": ("%%%", "base64"),
    }
    for route, make in IMAGE_ROUTES.items():
        for what, (data, reason) in cases.items():
            r = requests.post(served.url + API + route, json=make(data), timeout=60)
            assert 400 <= r.status_code < 500, (route, what, r.status_code, r.text[:300])
            assert reason in r.json()["detail"], (route, what, r.text[:300])
            assert "Traceback" not in r.text
    assert requests.post(served.url + API + "/png-info", json={"image": b64(good)}, timeout=30).status_code == 200


def test_bodies_over_the_limit_answer_413(served: Server) -> None:
    big = b64(b"\0" * (3 * 2**20))
    for route in [*IMAGE_ROUTES, "/txt2img", "/options"]:
        r = requests.post(served.url + API + route, json={"image": big, "prompt": big}, timeout=60)
        assert r.status_code == 413 and "limit" in r.json()["detail"], route
    # without a declared length (chunked), counted as it arrives
    def chunks():
        for _ in range(30):
            yield b"x" * 2**17

    r = requests.post(served.url + API + "/png-info", data=chunks(), headers={"content-type": "application/json"},
                      timeout=60)
    assert r.status_code == 413
    r = requests.post(served.url + "/gradio_api/upload", files={"files": ("a.png", b"\0" * (3 * 2**20))}, timeout=60)
    assert r.status_code == 413
    assert requests.get(served.url + API + "/samplers", timeout=30).status_code == 200  # still serving


# --- before login ---------------------------------------------------------------------------------------


def test_nothing_about_the_app_before_login(tmp_path: Path, checkpoint_store: Path) -> None:
    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    s = start_server(tmp_path, "--gradio-auth", "ann:secret")
    try:
        page = requests.get(s.url + "/", timeout=30).text
        for secret in ("sd1.safetensors", "txt2img", "Euler", "Lanczos", "extensions_install", "sdapi"):
            assert secret not in page, secret
        assert "gradio_api_info = null" in page
        for method, path in (("POST", "/gradio_api/cancel"), ("POST", "/gradio_api/reset"),
                             ("GET", "/gradio_api/heartbeat/x"), ("POST", "/gradio_api/stream/x"),
                             ("GET", "/gradio_api/runs"), ("POST", "/gradio_api/queue/join"),
                             ("POST", "/gradio_api/upload")):
            r = requests.request(method, s.url + path, json={}, timeout=30)
            assert r.status_code in (401, 404), (path, r.status_code)
            assert "sd1" not in r.text
        session = requests.Session()
        assert session.post(s.url + "/login", data={"username": "ann", "password": "secret"},
                            timeout=30).status_code == 200
        assert "txt2img" in session.get(s.url + "/", timeout=30).text  # after login, the app
    finally:
        stop_server(s)


# --- output folders ----------------------------------------------------------------------------------------


def test_output_folders_stay_in_the_data_folder(served: Server) -> None:
    for outside in ("/tmp/elsewhere", "../up", "~/pictures"):
        r = requests.post(served.url + API + "/options", json={"outdir_txt2img_samples": outside}, timeout=30)
        assert r.status_code == 422 and "inside the data folder" in r.json()["detail"], outside
    r = requests.post(served.url + API + "/options", json={"outdir_txt2img_samples": "mine/txt"}, timeout=30)
    assert r.status_code == 200
    assert requests.post(served.url + API + "/options", json={"outdir_txt2img_samples": ""}, timeout=30).ok


# --- memory -----------------------------------------------------------------------------------------------


def test_finished_jobs_keep_results_not_inputs(tmp_path: Path, checkpoint_store: Path) -> None:
    from webui.app import build_engine
    from webui.config import Config
    from webui.pipeline.request import GenerationRequest

    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    engine = build_engine(Config(data_dir=tmp_path, job_retention_count=3))
    init = Image.new("RGB", (256, 256), (9, 9, 9))
    jobs = []
    for seed in range(5):
        request = GenerationRequest(prompt="x", steps=2, width=64, height=64, seed=seed, init_images=(init,),
                                    save_images=False)
        job = engine.submit(request)
        job.done.wait(300)
        assert job.state == "done", job.error
        jobs.append(job)
    for job in jobs:
        assert job.request.init_images == () and job.request.mask is None
        assert job.events.qsize() == 1  # only the end marker: no previews left behind
        with pytest.raises(RuntimeError):
            job.work(None, None, 0, None)  # the closure over the request is gone
    count, size = engine.jobs.retained()
    assert count == 3 and 3 * 64 * 64 * 3 <= size < 4 * 64 * 64 * 3  # three 64x64 RGB results (and previews)
    assert engine.jobs.get(jobs[0].id) is None and engine.jobs.get(jobs[-1].id) is jobs[-1]


def test_retained_bytes_are_capped() -> None:
    from webui.jobs.queue import JobQueue

    queue = JobQueue(max_jobs=100, max_bytes=3 * 100 * 100 * 3)
    done = [queue.submit("x", lambda p, c, e, w: [Image.new("RGB", (100, 100))]) for _ in range(5)]
    for job in done:
        job.done.wait(30)
    count, size = queue.retained()
    assert (count, size) == (3, 3 * 100 * 100 * 3)
    assert [queue.get(j.id) is not None for j in done] == [False, False, True, True, True]


def test_json_bodies_decode_once(served: Server) -> None:
    """A malformed JSON body is a 4xx, not a 500 (the body is read once, within the limit)."""
    r = requests.post(served.url + API + "/img2img", data=b"{" + b"[" * 50000, timeout=30,
                      headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    assert json.loads(requests.get(served.url + API + "/progress", timeout=30).text)["progress"] >= 0


def test_no_reference_cycle_keeps_a_finished_jobs_inputs(tmp_path: Path, checkpoint_store: Path) -> None:
    """Freed by reference counting as soon as the job ends, not at some later garbage collection
    (a cycle through the job's closures kept 100 MB uploads alive for minutes)."""
    import gc

    from webui.app import build_engine
    from webui.config import Config
    from webui.pipeline.request import GenerationRequest

    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    engine = build_engine(Config(data_dir=tmp_path))

    def run_one(seed: int) -> None:
        job = engine.submit(GenerationRequest(prompt="x", steps=1, width=64, height=64, seed=seed, save_images=False,
                                              init_images=(Image.new("RGB", (777, 555), (9, 9, 9)),)))
        job.done.wait(300)
        assert job.state == "done", job.error

    run_one(0)  # warm-up: the model loads
    gc.collect()
    gc.disable()
    try:
        run_one(1)
        run_one(2)
        alive = [o for o in gc.get_objects() if isinstance(o, Image.Image) and o.size == (777, 555)]
        assert alive == []
    finally:
        gc.enable()
