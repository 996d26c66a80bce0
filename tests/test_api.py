"""The HTTP API over real HTTP: every /sdapi/v1 route, same pixels as the CLI, info vs infotext,
per-request overrides, 20 concurrent requests, interrupt, queued jobs, auth, bad input, fuzz."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import Server, add_checkpoint, free_port, start_server, stop_server
from webui.infotext import parse_infotext

API = "/sdapi/v1"
SMALL = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, checkpoint_store: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("api")
    add_checkpoint(root, checkpoint_store, "sd1.safetensors")
    add_checkpoint(root, checkpoint_store, "sd1-other.safetensors")
    s = start_server(root, "--api", "--max-steps", "60", "--max-pixels", str(256 * 256 * 4), "--ckpt", "sd1",
                     ready=API + "/samplers")
    yield s
    stop_server(s)


def post(s: Server, route: str, body: dict | None = None, **kw) -> requests.Response:
    return requests.post(s.url + API + route, json=body if body is not None else {}, timeout=300, **kw)


def get(s: Server, route: str, **kw) -> requests.Response:
    return requests.get(s.url + API + route, timeout=60, **kw)


def decode(b64: str) -> Image.Image:
    assert not b64.startswith("data:")
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_txt2img_matches_the_command_line_and_its_info(api: Server) -> None:
    body = {**SMALL, "seed": 31, "batch_size": 2, "negative_prompt": "fog", "cfg_scale": 6.5}
    r = post(api, "/txt2img", body)
    assert r.status_code == 200, r.text
    data = r.json()
    info = json.loads(data["info"])
    # as A1111 answers a batch: the grid first (return_grid), its infotext the first image's
    assert info["all_seeds"] == [31, 32] and info["seed"] == 31 and len(info["infotexts"]) == 3
    assert info["index_of_first_image"] == 1 and info["infotexts"][0] == info["infotexts"][1]
    assert data["parameters"]["prompt"] == "a lighthouse" and data["parameters"]["seed"] == 31
    grid, *images = [decode(b) for b in data["images"]]
    assert grid.size == (128, 64)
    assert np.array_equal(np.asarray(grid.crop((64, 0, 128, 64))), np.asarray(images[1]))
    for image, text, seed in zip(images, info["infotexts"][1:], info["all_seeds"]):
        fields = parse_infotext(text)
        assert image.info["parameters"] == text  # the PNG carries its infotext
        assert (fields["Seed"], fields["Negative prompt"], fields["CFG scale"]) == (str(seed), "fog", "6.5")
        assert fields["Model"] == info["sd_model_name"] == "sd1"
        assert fields["Model hash"] == info["sd_model_hash"]
    cli = subprocess.run(
        [sys.executable, "-m", "webui", "txt2img", "--data-dir", str(api.data_dir), "--ckpt", "sd1",
         "--prompt", "a lighthouse", "--negative-prompt", "fog", "--steps", "2", "--width", "64", "--height", "64",
         "--sampler", "Euler", "--seed", "31", "--batch-size", "2", "--cfg-scale", "6.5"],
        capture_output=True, text=True, timeout=300, cwd=api.data_dir,
    )
    assert cli.returncode == 0, cli.stderr
    grid_path, *paths = cli.stdout.split()
    assert "txt2img-grids" in grid_path and np.array_equal(np.asarray(Image.open(api.data_dir / grid_path)),
                                                           np.asarray(grid))
    for line, image in zip(paths, images, strict=True):
        assert np.array_equal(np.asarray(Image.open(api.data_dir / line)), np.asarray(image))


def test_img2img_with_a_mask_matches_the_command_line(api: Server, tmp_path: Path) -> None:
    init = Image.new("RGB", (64, 64), (20, 120, 220))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {**SMALL, "seed": 9, "init_images": ["data:image/png;base64," + b64png(init)], "mask": b64png(mask),
            "denoising_strength": 0.8, "mask_blur": 0, "inpainting_fill": 1,
            "inpaint_full_res": False}  # the CLI's default; the API's is A1111's (only masked)
    r = post(api, "/img2img", body)
    assert r.status_code == 200, r.text
    out = decode(r.json()["images"][0])
    assert (np.asarray(out.convert("RGB"))[:8, :8] == [20, 120, 220]).all()
    assert "init_images" not in r.json()["parameters"]  # not echoed back unless asked
    init.save(tmp_path / "init.png"), mask.save(tmp_path / "mask.png")
    cli = subprocess.run(
        [sys.executable, "-m", "webui", "img2img", "--data-dir", str(api.data_dir), "--ckpt", "sd1", "--prompt",
         "a lighthouse", "--steps", "2", "--width", "64", "--height", "64", "--sampler", "Euler", "--seed", "9",
         "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
         "--denoising-strength", "0.8", "--mask-blur", "0"],
        capture_output=True, text=True, timeout=300, cwd=api.data_dir,
    )
    assert cli.returncode == 0, cli.stderr
    assert np.array_equal(np.asarray(Image.open(api.data_dir / cli.stdout.strip())), np.asarray(out))


def test_outpainting_over_http_matches_the_command_line(api: Server, tmp_path: Path) -> None:
    init = Image.new("RGB", (64, 48), (200, 60, 30))
    body = {**SMALL, "seed": 4, "init_images": [b64png(init)], "outpaint": [0, 8, 40, 0], "denoising_strength": 0.9,
            "mask_blur": 0}
    r = post(api, "/img2img", body)
    assert r.status_code == 200, r.text
    out = decode(r.json()["images"][0])
    assert out.size == (104, 56)  # 64 + 40 wide, 48 + 8 high, the width/height fields not used
    assert "Size: 104x56" in json.loads(r.json()["info"])["infotexts"][0]
    init.save(tmp_path / "init.png")
    cli = subprocess.run(
        [sys.executable, "-m", "webui", "img2img", "--data-dir", str(api.data_dir), "--ckpt", "sd1", "--prompt",
         "a lighthouse", "--steps", "2", "--sampler", "Euler", "--seed", "4", "--init-image", str(tmp_path / "init.png"),
         "--outpaint", "0,8,40,0", "--denoising-strength", "0.9", "--mask-blur", "0"],
        capture_output=True, text=True, timeout=300, cwd=api.data_dir,
    )
    assert cli.returncode == 0, cli.stderr
    assert np.array_equal(np.asarray(Image.open(api.data_dir / cli.stdout.strip())), np.asarray(out))
    for bad, field in (({"outpaint": [0, 8]}, "outpaint"), ({"outpaint": [0, 0, -8, 0]}, "outpaint"),
                       ({"outpaint": [0, 0, 9000, 0]}, "outpaint")):
        r = post(api, "/img2img", {**body, **bad})
        assert r.status_code == 422 and field in r.text, r.text
    r = post(api, "/txt2img", {**SMALL, "outpaint": [8, 8, 8, 8]})
    assert r.status_code == 422 and "init image" in r.text, r.text


def test_override_settings_apply_to_that_request_only(api: Server) -> None:
    other = post(api, "/txt2img", {**SMALL, "seed": 3, "override_settings": {"sd_model_checkpoint": "sd1-other"}})
    assert other.status_code == 200, other.text
    assert json.loads(other.json()["info"])["sd_model_name"] == "sd1-other"
    plain = post(api, "/txt2img", {**SMALL, "seed": 3})
    assert json.loads(plain.json()["info"])["sd_model_name"] == "sd1"
    assert get(api, "/options").json()["sd_model_checkpoint"].startswith("sd1.safetensors")


def test_options_switch_the_server_model(api: Server) -> None:
    assert post(api, "/options", {"sd_model_checkpoint": "sd1-other"}).status_code == 200
    try:
        assert get(api, "/options").json()["sd_model_checkpoint"].startswith("sd1-other.safetensors")
        r = post(api, "/txt2img", SMALL)
        assert json.loads(r.json()["info"])["sd_model_name"] == "sd1-other"
    finally:
        post(api, "/options", {"sd_model_checkpoint": "sd1"})
    bad = post(api, "/options", {"sd_model_checkpoint": "nope"})
    assert bad.status_code == 404 and "nope" in bad.json()["detail"]
    assert post(api, "/options", {"no_such_option": 1}).status_code == 422
    # A1111's names for the checkpoint caches are ours under another name
    assert post(api, "/options", {"sd_checkpoint_cache": 2}).status_code == 200
    try:
        options = get(api, "/options").json()
        assert options["ckpt_cache"] == options["sd_checkpoint_cache"] == 2
        assert options["sd_checkpoints_limit"] == options["model_cache_size"] == 1
        assert post(api, "/options", {"sd_checkpoints_limit": 0}).status_code == 422
    finally:
        post(api, "/options", {"sd_checkpoint_cache": 0})
    # settings through options: saved to config.json, applied to the next image
    r = post(api, "/options", {"samples_format": "jpeg", "filename_pattern": "[seed]-[steps]"})
    assert r.status_code == 200, r.text
    try:
        assert get(api, "/options").json()["samples_format"] == "jpeg"
        saved = post(api, "/txt2img", {**SMALL, "seed": 77, "save_images": True})
        assert saved.status_code == 200
        assert list((api.data_dir / "outputs" / "txt2img-images").rglob("*-77-2.jpg"))
        bad = post(api, "/options", {"samples_format": "tiff"})
        assert bad.status_code == 422 and "samples_format" in bad.json()["detail"]
    finally:
        post(api, "/options", {"samples_format": "png", "filename_pattern": "[seed]"})


def test_twenty_concurrent_requests_all_complete_with_their_own_seeds(api: Server) -> None:
    results: dict[int, requests.Response] = {}

    def one(seed: int) -> None:
        results[seed] = post(api, "/txt2img", {**SMALL, "steps": 1, "seed": seed, "prompt": f"prompt {seed}"})

    threads = [threading.Thread(target=one, args=(1000 + i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert sorted(results) == [1000 + i for i in range(20)]
    for seed, r in results.items():
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["all_seeds"] == [seed] and info["prompt"] == f"prompt {seed}"
        assert parse_infotext(info["infotexts"][0])["Prompt"] == f"prompt {seed}"


def test_queued_jobs_lifecycle_and_interrupt_of_the_running_job_only(api: Server) -> None:
    long = post(api, "/jobs", {**SMALL, "steps": 60, "seed": 1})
    queued = post(api, "/jobs", {**SMALL, "seed": 2})
    dropped = post(api, "/jobs", {**SMALL, "seed": 3})
    assert long.status_code == queued.status_code == 202
    ids = [x.json()["id"] for x in (long, queued, dropped)]
    assert dropped.json()["state"] == "queued" and dropped.json()["position"] >= 2
    # cancel the third while it waits: only that one
    assert requests.delete(api.url + API + f"/jobs/{ids[2]}", timeout=30).json()["state"] == "cancelled"
    deadline = time.monotonic() + 120
    while get(api, f"/jobs/{ids[0]}").json()["state"] != "running" or get(api, "/progress").json()["state"][
            "sampling_step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    progress = get(api, "/progress").json()
    assert progress["state"]["job"] == ids[0] and 0 < progress["progress"] < 1
    assert post(api, "/interrupt").json()["interrupted"] == ids[0]
    results = {}
    for job_id in ids[:2]:
        while (status := get(api, f"/jobs/{job_id}").json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        results[job_id] = status
    first, second = results[ids[0]], results[ids[1]]
    assert first["state"] == "done" and json.loads(first["result"]["info"])["interrupted"]
    assert second["state"] == "done" and not json.loads(second["result"]["info"])["interrupted"]
    assert json.loads(second["result"]["info"])["all_seeds"] == [2]
    assert decode(second["result"]["images"][0]).size == (64, 64)
    assert get(api, "/jobs/" + "0" * 32).status_code == 404


def test_listing_routes(api: Server) -> None:
    models = get(api, "/sd-models").json()
    assert {m["model_name"] for m in models} == {"sd1", "sd1-other"}
    assert set(models[0]) >= {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert any(s["name"] == "DPM++ 2M" for s in get(api, "/samplers").json())
    assert any(s["label"] == "Karras" for s in get(api, "/schedulers").json())
    assert {"Lanczos", "Nearest"} <= {u["name"] for u in get(api, "/upscalers").json()}
    for route, kind in (("/sd-vae", list), ("/loras", list), ("/prompt-styles", list), ("/scripts", dict),
                        ("/extensions", list), ("/embeddings", dict), ("/memory", dict), ("/cmd-flags", dict)):
        r = get(api, route)
        assert r.status_code == 200 and isinstance(r.json(), kind), route
    flags = get(api, "/cmd-flags").json()
    assert flags["api"] is True and flags["attention_backend"] in ("sdpa", "sliced", "xformers")
    assert "attention=" in flags["runtime"] and "memory=" in flags["runtime"]
    assert get(api, "/memory").json()["ram"]["total"] > 0
    for route in ("/refresh-checkpoints", "/refresh-vae", "/refresh-loras", "/skip", "/interrupt"):
        assert post(api, route).status_code == 200, route


def test_extras_and_png_info(api: Server) -> None:
    r = post(api, "/txt2img", {**SMALL, "seed": 4})
    generated = r.json()["images"][0]
    info = post(api, "/png-info", {"image": generated}).json()
    assert info["parameters"]["Seed"] == "4" and info["info"].startswith("a lighthouse")
    up = post(api, "/extra-single-image", {"image": generated, "upscaler_1": "Lanczos", "upscaling_resize": 2})
    assert up.status_code == 200, up.text
    big = decode(up.json()["image"])
    assert big.size == (128, 128) and "Postprocess upscaler: Lanczos" in big.info["parameters"]
    to = post(api, "/extra-single-image", {"image": generated, "upscaler_1": "Nearest", "resize_mode": 1,
                                           "upscaling_resize_w": 96, "upscaling_resize_h": 80})
    assert decode(to.json()["image"]).size == (96, 80)


BAD = [
    ("/txt2img", {"sampler_name": "Nope a"}, 422, "sampler"),
    ("/txt2img", {"checkpoint": "missing-model"}, 404, "missing-model"),
    ("/txt2img", {"override_settings": {"sd_model_checkpoint": "missing-model"}}, 404, "missing-model"),
    ("/txt2img", {"enable_hr": True, "hr_upscaler": "4x-Nope"}, 422, "hr_upscaler"),
    ("/txt2img", {"steps": 0}, 422, "steps"),
    ("/txt2img", {"steps": 61}, 422, "steps"),
    ("/txt2img", {"width": 0}, 422, "width"),
    ("/txt2img", {"width": 2048, "height": 2048}, 422, "budget"),
    ("/txt2img", {"batch_size": -1}, 422, "batch_size"),
    ("/txt2img", {"cfg_scale": 1e9}, 422, "cfg_scale"),
    ("/txt2img", {"steps": "many"}, 422, "steps"),
    ("/txt2img", {"prompt": ["not", "text"]}, 422, "prompt"),
    ("/txt2img", {"init_images": ["aGVsbG8="]}, 422, "image"),
    ("/img2img", {}, 422, "init_images"),
    ("/img2img", {"init_images": ["%%%not base64"]}, 422, "base64"),
    ("/img2img", {"init_images": ["aGVsbG8gd29ybGQ="]}, 422, "not an image"),
    ("/img2img", {"init_images": ["http://169.254.169.254/latest/meta-data"]}, 422, "URL"),
    ("/img2img", {"init_images": "not a list"}, 422, "init_images"),
    ("/extra-single-image", {"image": "", "upscaler_1": "Lanczos"}, 422, "image"),
    ("/extra-single-image", {"upscaler_1": "Lanczos"}, 422, "image"),
    ("/png-info", {"image": "@@"}, 422, "image"),
]


@pytest.mark.parametrize(("route", "body", "status", "says"), BAD, ids=[f"{r}-{i}" for i, (r, *_) in enumerate(BAD)])
def test_bad_input_answers_4xx_with_the_reason(api: Server, route: str, body: dict, status: int, says: str) -> None:
    r = post(api, route, {**SMALL, **body} if route in ("/txt2img", "/img2img") else body)
    assert r.status_code == status, r.text
    assert says.lower() in r.json()["detail"].lower()
    assert "Traceback" not in r.text


def test_adjusted_input_is_said(api: Server) -> None:
    init = Image.new("RGB", (64, 64), (200, 10, 10))
    r = post(api, "/img2img", {**SMALL, "width": 70, "init_images": [b64png(init)],
                               "mask": b64png(Image.new("L", (32, 32), 255)),
                               "inpaint_full_res": False})  # whole picture: the output has the request's size
    assert r.status_code == 200, r.text
    notes = json.loads(r.json()["info"])["notes"]
    assert any("width 70 rounded to 72" in n for n in notes)
    assert any("mask 32x32 resized" in n for n in notes)
    assert decode(r.json()["images"][0]).size == (72, 64)
    assert requests.post(api.url + API + "/txt2img", data="{not json", timeout=30,
                         headers={"content-type": "application/json"}).status_code == 422


def test_fuzzed_bodies_never_get_a_500(api: Server) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    keys = ["prompt", "negative_prompt", "steps", "cfg_scale", "seed", "width", "height", "batch_size", "n_iter",
            "sampler_name", "scheduler", "denoising_strength", "enable_hr", "hr_scale", "subseed_strength",
            "clip_skip", "styles", "override_settings", "init_images", "mask", "eta", "tiling", "hr_upscaler",
            "refiner_checkpoint", "refiner_switch_at", "resize_mode", "inpainting_fill", "unknown_field"]
    values = st.one_of(
        st.none(), st.booleans(), st.integers(-10**12, 10**12), st.integers(0, 80),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
        st.sampled_from(["Euler", "DPM++ 2M Karras", "Karras", "Latent", "Lanczos", "sd1", "", "aGk=",
                         "data:image/png;base64,xx"]),
        st.lists(st.text(max_size=5), max_size=2), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    )
    bodies = st.dictionaries(st.sampled_from(keys), values, max_size=6)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, route=st.sampled_from(["/txt2img", "/img2img", "/jobs"]))
    def check(body: dict, route: str) -> None:
        body = {"steps": 1, "width": 64, "height": 64, **body}
        r = requests.post(api.url + API + route, data=json.dumps(body, allow_nan=True), timeout=300,
                          headers={"content-type": "application/json"})
        assert r.status_code < 500, (body, r.text)
        if route == "/jobs" and r.status_code == 202:
            requests.delete(api.url + API + "/jobs/" + r.json()["id"], timeout=30)

    check()
    assert post(api, "/txt2img", SMALL).status_code == 200  # and the server still serves


def test_auth_covers_every_api_route_and_the_docs(tmp_path: Path, checkpoint_store: Path) -> None:
    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    s = start_server(tmp_path, "--api", "--api-auth", "ann:secret", ready=API + "/samplers")
    try:
        auth = ("ann", "secret")
        assert requests.get(s.url + "/openapi.json", timeout=30).status_code == 401
        assert requests.get(s.url + "/docs", timeout=30).status_code == 401
        schema = requests.get(s.url + "/openapi.json", auth=auth, timeout=30).json()
        assert requests.get(s.url + "/docs", auth=auth, timeout=30).status_code == 200
        routes = [(path, method) for path, ops in schema["paths"].items() for method in ops]
        assert len(routes) >= 27
        for path, method in routes:
            url = s.url + path.replace("{job_id}", "0" * 32)
            r = requests.request(method, url, json={}, timeout=30)
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.headers.get("www-authenticate", "").startswith("Basic")
            wrong = requests.request(method, url, json={}, auth=("ann", "nope"), timeout=30)
            assert wrong.status_code == 401, (method, path)
        assert requests.get(s.url + API + "/sd-models", auth=auth, timeout=30).status_code == 200
    finally:
        stop_server(s)
    # without --api-auth, the page's --gradio-auth users guard the API too
    s = start_server(tmp_path, "--api", "--gradio-auth", "bo:pw", ready=API + "/samplers")
    try:
        assert requests.get(s.url + API + "/sd-models", timeout=30).status_code == 401
        assert requests.get(s.url + API + "/sd-models", auth=("bo", "pw"), timeout=30).status_code == 200
    finally:
        stop_server(s)


def test_nowebui_serves_the_api_alone(tmp_path: Path, checkpoint_store: Path) -> None:
    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    port = free_port()
    log = tmp_path / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "webui", "--nowebui", "--port", str(port), "--data-dir",
                                 str(tmp_path)], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if requests.get(url + API + "/sd-models", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert requests.get(url + "/", timeout=10).status_code == 404  # no page
        r = requests.post(url + API + "/txt2img", json=SMALL, timeout=300)
        assert r.status_code == 200 and decode(r.json()["images"][0]).size == (64, 64)
    finally:
        proc.terminate()
        proc.wait(15)


def test_files_outside_the_output_folder_are_not_served(api: Server, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    outputs = api.data_dir / "outputs"
    outputs.mkdir(exist_ok=True)
    link = outputs / "link.txt"
    if not link.exists():
        link.symlink_to(secret)
    for path in (str(secret), f"{outputs}/../../{secret.parent.name}/secret.txt", "/etc/passwd",
                 f"{outputs}/..%2f..%2fetc%2fpasswd", str(link), "..%2F..%2Fetc%2Fpasswd"):
        for prefix in ("/gradio_api/file=", "/file="):
            r = requests.get(api.url + prefix + path, timeout=30)
            assert r.status_code in (403, 404, 405), (prefix, path, r.status_code)
            assert "top secret" not in r.text and "root:" not in r.text
