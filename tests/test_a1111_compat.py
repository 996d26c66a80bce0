"""A1111 API conformance, as other people's code speaks it: `webuiapi` (the published Python client),
A1111's complete default payloads, JSON null in every optional field, A1111's option keys, and the
routes clients call. Over real HTTP against the real server."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image, PngImagePlugin

from tests.conftest import Server, add_checkpoint, start_server, stop_server

API = "/sdapi/v1"
DATA = Path(__file__).parent / "data" / "a1111"
TXT2IMG_DEFAULTS = json.loads((DATA / "txt2img_defaults.json").read_text())
IMG2IMG_DEFAULTS = json.loads((DATA / "img2img_defaults.json").read_text())
# what a test changes from A1111's defaults so that a tiny model on a CPU answers in a second
FAST = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 5}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, checkpoint_store: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("a1111")
    add_checkpoint(root, checkpoint_store, "sd1.safetensors")
    add_checkpoint(root, checkpoint_store, "sd1-other.safetensors")
    s = start_server(root, "--api", "--ckpt", "sd1", ready=API + "/samplers")
    yield s
    stop_server(s)


def post(s: Server, route: str, body: dict | None = None) -> requests.Response:
    return requests.post(s.url + API + route, json=body if body is not None else {}, timeout=300)


def get(s: Server, route: str) -> requests.Response:
    return requests.get(s.url + API + route, timeout=60)


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def init_image() -> Image.Image:
    image = Image.new("RGB", (64, 64), (30, 120, 200))
    image.paste((220, 40, 40), (8, 8, 40, 40))
    return image


# --- A1111's own default payloads, and nulls ------------------------------------------------------


@pytest.mark.parametrize("route", ["txt2img", "img2img"])
def test_a1111_complete_default_payload_gives_an_image(api: Server, route: str) -> None:
    body = {**(TXT2IMG_DEFAULTS if route == "txt2img" else IMG2IMG_DEFAULTS), **FAST}
    if route == "img2img":
        body["init_images"] = [b64png(init_image())]
    r = post(api, "/" + route, body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert len(data["images"]) == 1 and pixels(data["images"][0]).shape == (64, 64, 3)
    info = json.loads(data["info"])
    assert info["seed"] == 5 and info["all_seeds"] == [5]
    assert "Sampler: Euler," in info["infotexts"][0]  # A1111: a null sampler_name means sampler_index ("Euler")
    # every field A1111 sent is echoed back, as A1111 does
    assert set(body) - {"init_images", "mask"} <= set(data["parameters"])


@pytest.mark.parametrize("route", ["txt2img", "img2img"])
def test_null_in_every_optional_field_means_the_default(api: Server, route: str) -> None:
    """Every field but the ones the test sets is sent as JSON null; the image equals the one the
    same request gives without those fields."""
    defaults = TXT2IMG_DEFAULTS if route == "txt2img" else IMG2IMG_DEFAULTS
    given = {**FAST, "sampler_name": "Euler", "cfg_scale": 6.0}
    if route == "img2img":
        given["init_images"] = [b64png(init_image())]
        given["denoising_strength"] = 0.6
    nulls = {k: None for k in defaults if k not in given}
    with_nulls = post(api, "/" + route, {**nulls, **given})
    without = post(api, "/" + route, given)
    assert with_nulls.status_code == 200, with_nulls.text
    assert without.status_code == 200, without.text
    assert np.array_equal(pixels(with_nulls.json()["images"][0]), pixels(without.json()["images"][0]))


def test_a1111_sentinels_mean_what_they_mean_there(api: Server) -> None:
    """-1 / 0 for "off", "" for "unset", A1111's name strings: same image as leaving them out."""
    plain = post(api, "/txt2img", {**FAST, "sampler_name": "Euler"})
    sentinels = {**FAST, "sampler_name": "", "sampler_index": "Euler", "scheduler": "automatic",
                 "seed_resize_from_w": -1, "seed_resize_from_h": -1, "s_tmax": 0, "s_churn": 0, "s_tmin": 0,
                 "refiner_checkpoint": "None", "hr_checkpoint_name": "Use same checkpoint", "hr_sampler_name": "",
                 "script_name": "", "script_args": [], "alwayson_scripts": {}, "override_settings": {},
                 "styles": [], "firstphase_width": 0, "firstphase_height": 0, "restore_faces": False}
    r = post(api, "/txt2img", sentinels)
    assert r.status_code == 200, r.text
    assert np.array_equal(pixels(r.json()["images"][0]), pixels(plain.json()["images"][0]))
    assert json.loads(r.json()["info"])["notes"] == []  # nothing here was ignored: all of it has A1111's meaning
    # A1111's scheduler names, not only labels
    r = post(api, "/txt2img", {**FAST, "sampler_name": "Euler", "scheduler": "align_your_steps"})
    assert r.status_code == 200 and "Schedule type: Align Your Steps" in json.loads(r.json()["info"])["infotexts"][0]


def test_features_we_lack_are_said_not_silently_dropped(api: Server) -> None:
    r = post(api, "/txt2img", {**FAST, "hr_checkpoint_name": "sd1-other", "s_min_uncond": 0.5})
    assert r.status_code == 200, r.text
    notes = " | ".join(json.loads(r.json()["info"])["notes"])
    assert "hr_checkpoint_name='sd1-other' ignored" in notes and "s_min_uncond=0.5 ignored" in notes


def test_restore_faces_without_weights_says_what_to_put_where(api: Server) -> None:
    r = post(api, "/txt2img", {**FAST, "restore_faces": True})
    assert r.status_code == 422 and "no face restorer here: put GFPGAN weights in" in r.text
    assert post(api, "/txt2img", {**FAST, "restore_faces": False}).status_code == 200


def test_really_wrong_values_still_answer_4xx(api: Server) -> None:
    for body, field in (({"steps": -3}, "steps"), ({"sampler_name": "Nope"}, "sampler_name"),
                        ({"width": "wide"}, "width"), ({"seed_resize_from_w": -7}, "seed_resize_from_w"),
                        ({"scheduler": "sideways"}, "schedule")):
        r = post(api, "/txt2img", {**FAST, **body})
        assert 400 <= r.status_code < 500, (body, r.text)
        assert field in r.json()["detail"], r.text
    r = post(api, "/img2img", {**IMG2IMG_DEFAULTS, **FAST})  # A1111's default init_images is null
    assert r.status_code == 422 and "init_images" in r.json()["detail"]


def test_infotext_field_fills_what_the_body_does_not_set(api: Server) -> None:
    text = "a red barn\nNegative prompt: fog\nSteps: 3, Sampler: Euler, CFG scale: 5, Seed: 77, Size: 64x64"
    r = post(api, "/txt2img", {"infotext": text, "steps": 2})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["prompt"], info["negative_prompt"], info["seed"], info["steps"]) == ("a red barn", "fog", 77, 2)


def test_fuzzed_a1111_bodies_never_get_a_500(api: Server) -> None:
    """Each field drawn from: A1111's default, null, or an arbitrary value; answers are 200 or 4xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    def field(key: str) -> st.SearchStrategy:
        default = IMG2IMG_DEFAULTS.get(key, TXT2IMG_DEFAULTS.get(key))
        return st.one_of(st.just(default), st.none(), st.integers(-2, 3), st.booleans(),
                         st.sampled_from(["", "None", "Euler", "Use same sampler", "automatic", "Latent", "-1"]),
                         st.lists(st.integers(0, 2), max_size=2), st.dictionaries(st.sampled_from(["a", "args"]),
                                                                                   st.integers(), max_size=1))

    keys = sorted(set(TXT2IMG_DEFAULTS) | set(IMG2IMG_DEFAULTS))
    bodies = st.fixed_dictionaries({}, optional={k: field(k) for k in keys})

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, route=st.sampled_from(["/txt2img", "/img2img"]))
    def check(body: dict, route: str) -> None:
        body = {**body, "steps": 1, "width": 64, "height": 64, "batch_size": 1, "n_iter": 1, "enable_hr": False}
        if route == "/img2img" and isinstance(body.get("init_images"), list):
            body["init_images"] = [b64png(init_image())]
        r = requests.post(api.url + API + route, json=body, timeout=300)
        assert r.status_code < 500, (body, r.text)

    check()
    assert post(api, "/txt2img", FAST).status_code == 200  # and the server still serves


# --- /options -------------------------------------------------------------------------------------


def test_options_speak_a1111(api: Server) -> None:
    options = get(api, "/options").json()
    for key in ("send_seed", "CLIP_stop_at_last_layers", "sd_model_checkpoint", "sd_checkpoint_hash", "sd_vae",
                "samples_format", "jpeg_quality", "outdir_txt2img_samples", "show_progress_every_n_steps",
                "sd_checkpoint_cache", "sd_checkpoints_limit", "live_previews_enable", "eta_noise_seed_delta"):
        assert key in options, key
    assert len(options) > 300
    assert options["sd_model_checkpoint"].startswith("sd1.safetensors [")
    # everything GET gives can be POSTed back unchanged
    r = post(api, "/options", options)
    assert r.status_code == 200, r.text
    assert r.json()["not_applied"] == []
    # an A1111 option we have no feature for is stored, reads back, and is reported as not applied
    r = post(api, "/options", {"CLIP_stop_at_last_layers": 2, "samples_format": "jpg"})
    assert r.status_code == 200, r.text
    assert r.json()["not_applied"] == ["CLIP_stop_at_last_layers"]
    after = get(api, "/options").json()
    assert after["CLIP_stop_at_last_layers"] == 2 and after["samples_format"] == "jpeg"
    # a key neither app has: 422, and nothing of the request is applied
    r = post(api, "/options", {"samples_format": "webp", "no_such_option_anywhere": 1})
    assert r.status_code == 422 and "no_such_option_anywhere" in r.json()["detail"]
    assert get(api, "/options").json()["samples_format"] == "jpeg"
    assert post(api, "/options", {"samples_format": "png"}).status_code == 200


def test_setting_sd_model_checkpoint_switches_the_model(api: Server) -> None:
    models = {m["model_name"]: m["title"] for m in get(api, "/sd-models").json()}
    try:
        r = post(api, "/options", {"sd_model_checkpoint": models["sd1-other"]})
        assert r.status_code == 200, r.text
        assert get(api, "/options").json()["sd_model_checkpoint"] == models["sd1-other"]
        info = json.loads(post(api, "/txt2img", FAST).json()["info"])
        assert info["sd_model_name"] == "sd1-other"
        assert post(api, "/options", {"sd_model_checkpoint": "no-such-model"}).status_code == 404
    finally:
        assert post(api, "/options", {"sd_model_checkpoint": models["sd1"]}).status_code == 200


# --- the routes clients call ------------------------------------------------------------------------


def test_routes_clients_call(api: Server) -> None:
    assert get(api, "/face-restorers").json() == []
    assert get(api, "/hypernetworks").json() == []
    assert isinstance(get(api, "/realesrgan-models").json(), list)
    assert isinstance(get(api, "/sd-modules").json(), list)
    for route in ("/refresh-embeddings", "/unload-checkpoint", "/reload-checkpoint"):
        r = post(api, route)
        assert r.status_code == 200, (route, r.text)
    scripts = {s["name"]: s for s in get(api, "/script-info").json()}
    assert scripts["dynamic-thresholding"]["is_alwayson"] is True
    assert all({"label", "value", "minimum", "maximum", "step", "choices"} <= set(a)
               for a in scripts["dynamic-thresholding"]["args"])
    r = post(api, "/interrogate", {"image": b64png(init_image()), "model": "clip"})
    assert r.status_code == 422 and "no BLIP captioner: put" in r.json()["detail"]
    assert "BLIP" in r.json()["detail"] and "clip_interrogate" in r.json()["detail"]  # where each would go
    tagger = post(api, "/interrogate", {"image": b64png(init_image()), "model": "deepdanbooru"})
    assert tagger.status_code == 422 and "no tagger in" in tagger.json()["detail"]
    assert post(api, "/interrogate", {"image": b64png(init_image()), "model": "nope"}).status_code == 404
    assert post(api, "/interrogate", {"image": "not base64!", "model": "clip"}).status_code == 422
    for route in ("/server-stop", "/server-kill", "/server-restart"):
        r = post(api, route)
        assert r.status_code == 403 and "--api-server-stop" in r.json()["detail"], route
    assert post(api, "/png-info", {"image": ""}).json() == {"info": "", "items": {}, "parameters": {}}
    assert post(api, "/txt2img", FAST).status_code == 200  # the server is still up


def test_extras_single_and_batch(api: Server) -> None:
    image = init_image()
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a boat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64")
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    with_info = base64.b64encode(buf.getvalue()).decode()
    base = {"resize_mode": 0, "show_extras_results": True, "gfpgan_visibility": 0, "codeformer_visibility": 0,
            "codeformer_weight": 0, "upscaling_resize": 2, "upscaling_resize_w": 512, "upscaling_resize_h": 512,
            "upscaling_crop": True, "upscaler_1": "Lanczos", "upscaler_2": None, "extras_upscaler_2_visibility": 0,
            "upscale_first": False}
    r = post(api, "/extra-single-image", {**base, "image": with_info})
    assert r.status_code == 200, r.text
    assert pixels(r.json()["image"]).shape == (128, 128, 3)
    blended = post(api, "/extra-single-image", {**base, "image": with_info, "upscaler_2": "Nearest",
                                                "extras_upscaler_2_visibility": 0.5})
    assert blended.status_code == 200, blended.text
    a, b = pixels(r.json()["image"]).astype(int), pixels(blended.json()["image"]).astype(int)
    assert not np.array_equal(a, b) and "upscaler 2: Nearest" in blended.json()["html_info"]
    r = post(api, "/extra-batch-images", {**base, "imageList": [{"data": with_info, "name": "one"},
                                                                 {"data": b64png(image), "name": "two"}]})
    assert r.status_code == 200, r.text
    assert [pixels(x).shape for x in r.json()["images"]] == [(128, 128, 3)] * 2
    assert post(api, "/extra-batch-images", {**base, "imageList": []}).status_code == 422


def test_server_stop_with_the_flag(tmp_path: Path, checkpoint_store: Path) -> None:
    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    s = start_server(tmp_path, "--nowebui", "--api-server-stop", ready=API + "/samplers")
    try:
        r = post(s, "/server-stop")
        assert r.status_code == 200 and r.text == "Stopping."
        s.process.wait(timeout=30)
    finally:
        stop_server(s)


# --- the published client ---------------------------------------------------------------------------


def test_webuiapi_client_works_unchanged(api: Server) -> None:
    import webuiapi

    host, port = api.url.removeprefix("http://").split(":")
    client = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=2)
    result = client.txt2img(prompt="a lighthouse", width=64, height=64, seed=11)
    assert result.image.size == (64, 64)
    assert result.info["seed"] == 11 and result.parameters["prompt"] == "a lighthouse"
    result = client.img2img(images=[init_image()], prompt="a harbour", width=64, height=64, seed=12,
                            denoising_strength=0.5)
    assert result.image.size == (64, 64) and result.info["all_seeds"] == [12]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpainted = client.img2img(images=[init_image()], mask_image=mask, prompt="a buoy", width=64, height=64, seed=3)
    assert inpainted.image.size == (64, 64)
    assert "Mask blur: 4" in inpainted.info["infotexts"][0]
    assert client.png_info(result.image).info.startswith("a harbour")
    up = client.extra_single_image(result.image, upscaler_1="Lanczos", upscaling_resize=2)
    assert up.image.size == (128, 128)
    batch = client.extra_batch_images([result.image, inpainted.image], upscaler_1="Nearest", upscaling_resize=2)
    assert [im.size for im in batch.images] == [(128, 128)] * 2
    assert client.util_get_current_model().startswith("sd1.safetensors")
    client.util_set_model("sd1-other")
    assert client.util_get_current_model().startswith("sd1-other")
    client.util_set_model("sd1.safetensors")
    options = client.get_options()
    client.set_options({"jpeg_quality": options["jpeg_quality"]})
    assert "euler" in [n.lower() for n in client.util_get_sampler_names()]
    assert "karras" in client.util_get_scheduler_names()
    for getter in (client.get_face_restorers, client.get_realesrgan_models, client.get_hypernetworks,
                   client.get_sd_vae, client.get_upscalers, client.get_prompt_styles, client.get_embeddings,
                   client.get_memory, client.get_cmd_flags, client.get_scripts, client.get_loras):
        assert getter() is not None
    with pytest.raises(RuntimeError, match="no BLIP captioner"):
        client.interrogate(result.image)
    started = time.monotonic()
    client.util_wait_for_ready(check_interval=0.2)
    assert time.monotonic() - started < 30


def test_extension_settings_and_arguments_through_the_api(api: Server) -> None:
    """An extension's Settings section reads and writes under its name in /options; a misspelt
    argument in alwayson_scripts is reported, not silently dropped."""
    options = get(api, "/options").json()
    assert options["prompt-filter"]["enabled"] is True
    try:
        r = post(api, "/options", {"prompt-filter": {"blocklist": "forbidden"}})
        assert r.status_code == 200, r.text
        assert get(api, "/options").json()["prompt-filter"]["blocklist"] == "forbidden"
        refused = post(api, "/txt2img", {**FAST, "prompt": "a forbidden thing"})
        assert 400 <= refused.status_code < 500
        assert post(api, "/options", {"prompt-filter": {"enabled": "sometimes"}}).status_code == 422
    finally:
        assert post(api, "/options", {"prompt-filter": {"blocklist": ""}}).status_code == 200
    r = post(api, "/txt2img", {**FAST, "alwayson_scripts": {"dynamic-thresholding": {"args": {
        "enabled": False, "treshold": 5}}}})
    assert r.status_code == 200, r.text
    notes = json.loads(r.json()["info"])["notes"]
    assert any("dynamic-thresholding.treshold" in n for n in notes), notes


def test_scripts_through_the_api_as_a1111_clients_call_them(api: Server) -> None:
    """`script_name`/`script_args` in A1111's positional form, through the published client; the
    grid comes first; scripts are listed with their arguments; a script we lack, or a bad cell,
    is a 422 naming the reason (never a silent 200)."""
    import webuiapi

    host, port = api.url.removeprefix("http://").split(":")
    client = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=2)
    xyz_args = [4, "1, 2", [], 0, "", [], 0, "", [], True, True, False, False, False, False, False, 0, False]
    result = client.txt2img(prompt="a lighthouse", width=64, height=64, seed=11, script_name="x/y/z plot",
                            script_args=xyz_args)
    assert len(result.images) == 3 and result.image.width == 128 and result.image.height > 64  # labels on top
    assert [im.size for im in result.images[1:]] == [(64, 64)] * 2
    assert "Script: X/Y/Z plot" in result.info["infotexts"][0] and "Steps: 2" in result.info["infotexts"][2]
    init = init_image().resize((32, 32))
    upscaled = client.img2img(images=[init], prompt="a harbour", width=64, height=64, seed=12, denoising_strength=0.4,
                              script_name="SD upscale", script_args=[None, 16, "Lanczos", 2.0])
    assert upscaled.image.size == (64, 64)
    scripts = get(api, "/scripts").json()
    assert "x/y/z plot" in scripts["txt2img"] and "sd upscale" in scripts["img2img"]
    assert "sd upscale" not in scripts["txt2img"] and "loopback" in scripts["img2img"]
    info = {(s["name"], s["is_img2img"]): s for s in get(api, "/script-info").json()}
    assert [a["label"] for a in info[("x/y/z plot", False)]["args"]][:3] == ["x_type", "x_values", "x_values_dropdown"]
    assert info[("x/y/z plot", False)]["is_alwayson"] is False
    missing = post(api, "/txt2img", {**FAST, "script_name": "ultimate sd upscale"})
    assert missing.status_code == 422 and "no script 'ultimate sd upscale'" in missing.text
    assert "x/y/z plot" in missing.text
    bad = post(api, "/txt2img", {**FAST, "script_name": "x/y/z plot", "script_args": [9, "Euler, Nope", []]})
    assert bad.status_code == 422 and "image 2 of 2" in bad.text and "Nope" in bad.text
    wrong = post(api, "/txt2img", {**FAST, "script_name": "x/y/z plot", "script_args": {"margin_size": "wide"}})
    assert wrong.status_code == 422 and "margin_size" in wrong.text
    assert post(api, "/txt2img", {**FAST, "script_name": None, "script_args": None}).status_code == 200
