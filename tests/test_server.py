"""The real server on a loopback port: page, gradio_client generation, errors, auth, share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests
from gradio_client import Client
from PIL import Image

from tests.conftest import Server, add_checkpoint, start_server, stop_server
from webui.infotext import parse_infotext


def test_page_is_served_with_the_txt2img_tab(server: Server) -> None:
    r = requests.get(server.url + "/", timeout=10)
    assert r.status_code == 200
    config = requests.get(server.url + "/config", timeout=10).json()
    shown = {str(c.get("props", {}).get(k)) for c in config["components"] for k in ("label", "value")}
    assert {"txt2img", "Prompt", "Negative prompt", "Sampling steps", "Seed", "Generate", "Output"} <= shown


def test_listens_on_loopback_only(server: Server) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    assert "0.0.0.0" not in server.output()


def test_generate_through_gradio_client(server: Server) -> None:
    client = Client(server.url, verbose=False)
    gallery, info = client.predict(
        checkpoint="sd1.safetensors", prompt="a lighthouse", negative_prompt="fog", sampler_name="Euler a",
        steps=4, width=64, height=64, batch_size=2, cfg_scale=7, seed=21, api_name="/txt2img",
    )
    assert len(gallery) == 3  # the batch's grid first, as A1111 shows it
    assert Image.open(gallery[0]["image"]).size == (128, 64)
    image = Image.open(gallery[1]["image"])
    assert image.size == (64, 64)
    fields = parse_infotext(image.info["parameters"])
    assert (fields["Prompt"], fields["Negative prompt"], fields["Seed"], fields["Size"]) == ("a lighthouse", "fog", "21", "64x64")
    assert fields["Sampler"] == "Euler a" and fields["Model"] == "sd1"
    assert "Seed: 22" in info
    saved = sorted(p.name for p in (server.data_dir / "outputs" / "txt2img-images").rglob("*.png"))
    # the server is shared with other tests, so the counter need not start at 0
    first = next(n for n in saved if n.endswith("-21.png"))
    assert f"{int(first[:5]) + 1:05d}-22.png" in saved


def test_bad_requests_answer_with_a_reason_and_the_server_keeps_serving(server: Server) -> None:
    client = Client(server.url, verbose=False)
    small = dict(prompt="x", steps=2, width=64, height=64, seed=1)
    for bad, expected in [
        (dict(checkpoint="no-such-model"), "not found"),
        (dict(checkpoint="sd1", sampler_name="Bogus"), "unknown sampler"),
        (dict(checkpoint="sd1", styles=["no-such-style"]), "style 'no-such-style' not found"),
        (dict(checkpoint="sd1", prompt="x <lora:nothing-here:1>"), "LoRA 'nothing-here' not found"),
        (dict(checkpoint="sd1", prompt="x <lora:a:heavy>"), "not a number"),
    ]:
        with pytest.raises(Exception, match=expected):
            client.predict(**{**small, **bad}, api_name="/txt2img")
    gallery, _ = client.predict(checkpoint="sd1", **small, api_name="/txt2img")
    assert len(gallery) == 1


def test_refresh_lists_a_new_checkpoint_with_its_hash(server: Server, checkpoint_store: Path) -> None:
    new = add_checkpoint(server.data_dir, checkpoint_store, "sd1-other.safetensors", "more/other.safetensors")
    client = Client(server.url, verbose=False)
    update, _help = client.predict("sd1.safetensors", api_name="/refresh_checkpoints")
    choices = [c[0] for c in update["choices"]]
    import hashlib

    assert f"more/other.safetensors [{hashlib.sha256(new.read_bytes()).hexdigest()[:10]}]" in choices
    assert update["value"].startswith("sd1.safetensors [")  # the selection is kept, now with its hash
    _gallery, info = client.predict(checkpoint="more/other.safetensors", prompt="x", steps=2, width=64, height=64,
                                    api_name="/txt2img")
    assert "Model: more/other" in info


def test_empty_models_folder_page_says_what_to_do(tmp_path: Path) -> None:
    s = start_server(tmp_path)
    try:
        config = requests.get(s.url + "/config", timeout=10).json()
        texts = " ".join(str(c.get("props", {}).get("value", "")) for c in config["components"])
        assert "No checkpoints yet" in texts and "Stable-diffusion" in texts
        client = Client(s.url, verbose=False)
        with pytest.raises(Exception, match="no checkpoints found"):
            client.predict(checkpoint=None, prompt="x", steps=2, width=64, height=64, api_name="/txt2img")
    finally:
        stop_server(s)


def test_api_routes_answer_from_the_first_request(tmp_path: Path) -> None:
    """A client that starts polling the API with the server gets no 404 while the page is up but
    the API not yet attached: the routes exist before the port accepts a connection."""
    s = start_server(tmp_path, "--api", ready="/sdapi/v1/sd-models", first_answer_ready=True)
    try:
        assert requests.get(s.url + "/sdapi/v1/face-restorers", timeout=10).json() == []
    finally:
        stop_server(s)


def test_gradio_auth_protects_the_page(tmp_path: Path, checkpoint_store: Path) -> None:
    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    s = start_server(tmp_path, "--gradio-auth", "alice:secret")
    try:
        assert requests.get(s.url + "/config", timeout=10).status_code == 401
        session = requests.Session()
        bad = session.post(s.url + "/login", data={"username": "alice", "password": "nope"}, timeout=10)
        assert bad.status_code >= 400
        ok = session.post(s.url + "/login", data={"username": "alice", "password": "secret"}, timeout=10)
        assert ok.status_code == 200
        assert session.get(s.url + "/config", timeout=10).status_code == 200
    finally:
        stop_server(s)


def test_console_names_our_share_flag(server: Server) -> None:
    """The console speaks of --share, not of Gradio's `launch(share=True)`."""
    import time

    deadline = time.monotonic() + 60
    while "Running on local URL" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.5)
    out = server.output()
    assert f"Running on local URL:  {server.url}" in out
    assert "start with --share" in out
    assert "share=True" not in out and "launch()" not in out


def test_share_without_internet_keeps_the_local_server(tmp_path: Path) -> None:
    """This machine has no internet, so the share tunnel cannot be made: the page must stay up."""
    s = start_server(tmp_path, "--share")
    try:
        import time

        deadline = time.monotonic() + 60
        while "Public link" not in s.output() and "gradio.live" not in s.output() and time.monotonic() < deadline:
            time.sleep(0.5)
        out = s.output()
        assert "gradio.live" in out or "Public link not created" in out
        assert requests.get(s.url + "/", timeout=10).status_code == 200
    finally:
        stop_server(s)


def test_img2img_batch_and_extras_folder_through_gradio_client(server: Server, tmp_path: Path) -> None:
    src, masks, out, up = tmp_path / "in", tmp_path / "masks", tmp_path / "out", tmp_path / "up"
    src.mkdir(), masks.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(src / "red.png")
    Image.new("RGB", (64, 64), (30, 30, 200)).save(src / "blue.jpg")
    (src / "notes.txt").write_text("not an image")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half of red.png only
    mask.save(masks / "red.png")
    client = Client(server.url, verbose=False)
    gallery, info = client.predict(
        checkpoint="sd1.safetensors", prompt="a castle", steps=3, width=64, height=64, seed=5, source="batch",
        batch_input_dir=str(src), batch_output_dir=str(out), batch_mask_dir=str(masks), denoising_strength=0.8,
        mask_blur=0, api_name="/img2img",
    )
    assert sorted(p.name for p in out.iterdir()) == ["blue.png", "red.png"]
    red = np.asarray(Image.open(out / "red.png").convert("RGB")).astype(int)
    assert (red[:, 40:] == [200, 30, 30]).all()  # outside its mask: the input
    assert np.abs(red[:, :24] - [200, 30, 30]).mean() > 1
    assert "Denoising strength: 0.8" in Image.open(out / "blue.png").info["parameters"]
    assert len(gallery) == 2
    # Extras: the same folder upscaled 2x into another
    _, text = client.predict(src=str(out), dst=str(up), name="Lanczos", how="Scale by", scale=2, w=64, h=64,
                             api_name="/extras_upscale_folder")
    assert "2 image(s)" in text
    assert Image.open(up / "red.png").size == (128, 128)
    # bad folders: a message, and the server keeps serving
    with pytest.raises(Exception, match="does not exist"):
        client.predict(checkpoint="sd1.safetensors", prompt="x", steps=1, width=64, height=64, source="batch",
                       batch_input_dir=str(tmp_path / "missing"), api_name="/img2img")
    with pytest.raises(Exception, match="must differ"):
        client.predict(src=str(src), dst=str(src), name="Lanczos", how="Scale by", scale=2, w=64, h=64,
                       api_name="/extras_upscale_folder")
    assert requests.get(server.url + "/", timeout=10).status_code == 200


def test_folder_batches_are_refused_when_listening_beyond_localhost(tmp_path: Path, checkpoint_store: Path) -> None:
    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    s = start_server(tmp_path, "--listen")
    try:
        client = Client(s.url, verbose=False)
        with pytest.raises(Exception, match="--listen"):
            client.predict(checkpoint="sd1.safetensors", prompt="x", steps=1, width=64, height=64, source="batch",
                           batch_input_dir=str(tmp_path), api_name="/img2img")
        with pytest.raises(Exception, match="--listen"):
            client.predict(src=str(tmp_path), dst=str(tmp_path / "o"), name="Lanczos", how="Scale by", scale=2,
                           w=64, h=64, api_name="/extras_upscale_folder")
    finally:
        stop_server(s)


def test_one_progress_bar_per_generation(server: Server) -> None:
    """Generating shows one progress bar (over the images), not one over each output."""
    config = requests.get(server.url + "/config", timeout=10).json()
    elem = {c["id"]: c["props"].get("elem_id") for c in config["components"]}
    for tab in ("txt2img", "img2img"):
        dep = next(d for d in config["dependencies"] if d.get("api_name") == tab)
        assert [elem[i] for i in dep["outputs"]] == [f"{tab}_gallery", f"{tab}_info"]
        assert [elem[i] for i in dep["show_progress_on"]] == [f"{tab}_gallery"]
