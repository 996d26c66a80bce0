"""The command line: `webui txt2img` / `python launch.py txt2img`, and the checkpoint maker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO
from webui.infotext import parse_infotext


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SKIP_INSTALL="1")
    return subprocess.run([*args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_txt2img_prints_one_path_per_image(data_dir: Path) -> None:
    ckpt = data_dir / "models/Stable-diffusion/sd1.safetensors"
    r = run(sys.executable, str(REPO / "launch.py"), "txt2img", "--ckpt", str(ckpt), "--prompt", "a house",
            "--steps", "3", "--width", "64", "--height", "64", "--seed", "7", "--batch-size", "2",
            "--sampler", "Euler", "--outdir", str(data_dir / "out"), cwd=data_dir)
    assert r.returncode == 0, r.stderr
    grid, *paths = [Path(line) for line in r.stdout.split()]
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    assert [p.name for p in paths] == ["00000-7.png", "00001-8.png"]
    assert grid.parent.parent.name == "txt2img-grids" and Image.open(grid).size == (128, 64)  # the batch's grid
    fields = parse_infotext(Image.open(paths[0]).info["parameters"])
    assert (fields["Prompt"], fields["Seed"], fields["Steps"], fields["Sampler"]) == ("a house", "7", "3", "Euler")


def test_console_script_by_title_and_same_pixels_as_launch(data_dir: Path) -> None:
    # beside this interpreter: a virtual environment used without activating it is not on PATH
    exe = shutil.which("webui", path=str(Path(sys.executable).parent)) or shutil.which("webui")
    assert exe, "the `webui` console script is not installed"
    common = ["--prompt", "a house", "--steps", "3", "--width", "64", "--height", "64", "--seed", "3", "--data-dir", str(data_dir)]
    a = run(exe, "txt2img", "--ckpt", "sd1", *common, cwd=data_dir)
    b = run(sys.executable, "-m", "webui", "txt2img", "--ckpt", "sd1.safetensors", *common, cwd=data_dir)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    pa, pb = Path(a.stdout.strip()), Path(b.stdout.strip())
    assert not pa.is_absolute() or pa.exists()
    img_a = np.asarray(Image.open(data_dir / pa if not pa.is_absolute() else pa))
    img_b = np.asarray(Image.open(data_dir / pb if not pb.is_absolute() else pb))
    assert np.array_equal(img_a, img_b)


def test_bad_input_gives_one_line_and_nonzero_exit(data_dir: Path) -> None:
    broken = data_dir / "models/Stable-diffusion/broken.safetensors"
    broken.write_bytes(os.urandom(64))
    cases = [
        (["--ckpt", "does-not-exist", "--prompt", "x"], "not found"),
        (["--ckpt", "broken", "--prompt", "x"], "broken.safetensors"),
        (["--ckpt", "sd1", "--prompt", "x", "--width", "65"], "multiple of 8"),
        (["--ckpt", "sd1", "--prompt", "x", "--steps", "0"], "steps"),
        (["--ckpt", "sd1", "--prompt", "x", "--sampler", "Nope"], "unknown sampler"),
    ]
    for args, expected in cases:
        r = run(sys.executable, "-m", "webui", "txt2img", "--data-dir", str(data_dir), *args, cwd=data_dir)
        assert r.returncode != 0, args
        assert "Traceback" not in r.stderr, r.stderr
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], r.stderr


def test_make_checkpoint_command(tmp_path: Path) -> None:
    out = tmp_path / "tiny.safetensors"
    r = run(sys.executable, "-m", "webui.testing.make_checkpoint", "--family", "sdxl", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size < 50_000_000
    from webui.models.detect import detect
    from webui.models.readers import read_state_dict

    assert detect(read_state_dict(out)).family.name == "sdxl"



@pytest.mark.parametrize("family,options,name,expected", [
    ("sdxl-vpred-ztsnr", [], "xl-vpred.safetensors", "sdxl"),
    ("sd3", [], "sd35.safetensors", "sd3"),
    ("sd3-split", [], "sd35-split.safetensors", "sd3"),
    ("flux", [], "flux1-dev.safetensors", "flux"),
    ("flux-schnell", ["--fp8"], "flux1-schnell-fp8.safetensors", "flux"),
    ("flux", ["--gguf", "Q4_0"], "flux1-dev-Q4_0.gguf", "flux"),
])
def test_make_checkpoint_writes_the_newer_families_as_users_keep_them(tmp_path: Path, family: str, options: list,
                                                                       name: str, expected: str) -> None:
    """Each file (with its VAE and text encoders where users keep them) loads as its family."""
    from webui.app import build_engine
    from webui.config import Config

    out = tmp_path / "models" / "Stable-diffusion" / name
    r = run(sys.executable, "-m", "webui.testing.make_checkpoint", "--family", family, *options, str(out),
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(out)
    engine = build_engine(Config(data_dir=tmp_path, dtype="float32", fp8_weights="upcast"))
    bundle = engine.bundle(Path(name).stem)
    assert bundle.family.name == expected
    if family == "sdxl-vpred-ztsnr":
        assert bundle.prediction == "v" and bundle.zero_terminal_snr
    if family == "sd3-split":
        assert bundle.module_names == ["clip_l", "clip_g", "t5xxl_fp16"]

def test_control_models_from_make_checkpoint_and_a_unit_from_the_command_line(data_dir: Path,
                                                                            checkpoint_store: Path) -> None:
    """make_checkpoint writes each ControlNet-side family to fit the tiny checkpoints (each loads
    for its family); `txt2img --controlnet --control-image --control-module` runs one unit, which the
    infotext records; --control-image alone, or a unit without its image, is one line of error."""
    from tests.conftest import add_checkpoint
    from webui.app import build_engine
    from webui.config import Config

    add_checkpoint(data_dir, checkpoint_store, "sdxl.safetensors")
    folder = data_dir / "models" / "ControlNet"
    made = {"controlnet-sd1": ("control_sd15_canny.safetensors", "sd1", "ControlNetModel"),
            "controlnet-sdxl": ("control_sdxl_canny.safetensors", "sdxl", "ControlNetModel"),
            "t2i-adapter-sd1": ("t2iadapter_canny_sd15v2.pth", "sd1", "T2IAdapter"),
            "ip-adapter-sd1": ("ip-adapter_sd15.safetensors", "sd1", "IPAdapterModel")}
    for family, (name, _, _) in made.items():
        r = run(sys.executable, "-m", "webui.testing.make_checkpoint", "--family", family, str(folder / name),
                cwd=data_dir)
        assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == str(folder / name), r.stderr
    assert (data_dir / "models" / "clip_vision" / "CLIP-ViT-H-14.safetensors").is_file()
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    for name, checkpoint, kind in made.values():
        assert type(engine.controlnets.load(Path(name).stem, engine.bundle(checkpoint))).__name__ == kind, name
    square = Image.new("RGB", (64, 64))
    square.paste((255, 255, 255), (16, 16, 48, 48))
    square.save(data_dir / "square.png")
    common = ["--data-dir", str(data_dir), "--ckpt", "sd1", "--prompt", "a tower", "--steps", "2", "--width", "64",
              "--height", "64", "--seed", "4", "--sampler", "Euler"]
    r = run(sys.executable, "-m", "webui", "txt2img", *common, "--controlnet", "control_sd15_canny",
            "--control-image", str(data_dir / "square.png"), "--control-module", "canny", "--control-weight", "0.8",
            cwd=data_dir)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    info = parse_infotext(Image.open(path if path.is_absolute() else data_dir / path).info["parameters"])
    assert info["ControlNet 0"].startswith("Module: canny, Model: control_sd15_canny [")
    assert "Weight: 0.8," in info["ControlNet 0"]
    for extra, expected in ((["--control-image", str(data_dir / "square.png")], "--control-image needs --controlnet"),
                            (["--controlnet", "control_sd15_canny"], "controlnet unit 0: no image")):
        r = run(sys.executable, "-m", "webui", "txt2img", *common, *extra, cwd=data_dir)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and expected in errors[0].lower(), r.stderr


def test_img2img_and_hires_from_the_command_line(data_dir: Path) -> None:
    from PIL import ImageDraw

    init = data_dir / "in.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(init)
    mask = data_dir / "mask.png"
    m = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(m).rectangle((16, 16, 47, 47), fill=255)
    m.save(mask)
    common = ["--ckpt", "sd1", "--prompt", "a house", "--steps", "3", "--width", "64", "--height", "64", "--seed", "5",
              "--data-dir", str(data_dir)]
    r = run(sys.executable, "-m", "webui", "img2img", *common, "--init-image", str(init), "--mask", str(mask),
            "--denoising-strength", "0.8", "--mask-blur", "0", cwd=data_dir)
    assert r.returncode == 0, r.stderr
    out = Image.open(data_dir / r.stdout.strip())
    assert "img2img-images" in r.stdout
    corner = np.asarray(out)[:8, :8]
    assert (corner == np.array([10, 200, 30])).all()  # outside the mask: the input's pixels
    assert parse_infotext(out.info["parameters"])["Denoising strength"] == "0.8"
    h = run(sys.executable, "-m", "webui", "txt2img", *common, "--enable-hr", "--hr-scale", "1.5", cwd=data_dir)
    assert h.returncode == 0, h.stderr
    assert Image.open(data_dir / h.stdout.strip()).size == (96, 96)
    bad = run(sys.executable, "-m", "webui", "img2img", *common, "--init-image", str(data_dir / "none.png"), cwd=data_dir)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "cannot read image" in bad.stderr
    o = run(sys.executable, "-m", "webui", "img2img", *common, "--init-image", str(init), "--outpaint", "0,0,16,8",
            "--inpainting-fill", "0", "--mask-blur", "0", cwd=data_dir)
    assert o.returncode == 0, o.stderr
    wide = Image.open(data_dir / o.stdout.strip())
    assert wide.size == (80, 72)
    assert (np.asarray(wide)[:48, :48] == np.array([10, 200, 30])).all()  # the original, kept
    badout = run(sys.executable, "-m", "webui", "img2img", *common, "--init-image", str(init), "--outpaint", "8,8",
                 cwd=data_dir)
    assert badout.returncode == 2 and "LEFT,TOP,RIGHT,BOTTOM" in badout.stderr and "Traceback" not in badout.stderr


def test_launch_xformers_flag_never_replaces_a_cpu_torch(tmp_path: Path) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    try:
        import launch
    finally:
        sys.path.remove(str(REPO))
    assert launch.wants_xformers(["--xformers"]) and launch.wants_xformers(["--attention", "xformers"])
    assert launch.wants_xformers(["--attention=xformers"]) and not launch.wants_xformers(["--attention", "sdpa"])
    if torch.version.cuda is not None:
        pytest.skip("a CUDA torch: launch.py would try to install xformers from the network")
    before = torch.__version__
    env = {k: v for k, v in os.environ.items() if k != "SKIP_INSTALL"}
    r = subprocess.run([sys.executable, str(REPO / "launch.py"), "--xformers", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "xformers needs a CUDA build of torch" in r.stdout and "pip" not in r.stdout
    version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                             text=True).stdout.strip()
    assert version == before


def test_xyz_plot_from_the_command_line(data_dir: Path) -> None:
    common = ["--ckpt", "sd1", "--prompt", "a house", "--steps", "2", "--width", "64", "--height", "64", "--seed", "3",
              "--sampler", "Euler", "--data-dir", str(data_dir)]
    r = run(sys.executable, "-m", "webui", "txt2img", *common, "--script", "x/y/z plot", "--x-type", "Steps",
            "--x-values", "1,2", "--y-type", "CFG Scale", "--y-values", "5, 9", cwd=data_dir)
    assert r.returncode == 0, r.stderr
    paths = [Path(line) for line in r.stdout.split()]
    grids = [p for p in paths if "txt2img-grids" in p.parts]
    assert len(grids) == 1 and len(paths) == 5  # the grid, then the four cells
    fields = parse_infotext(Image.open(data_dir / grids[0]).info["parameters"])
    assert (fields["Script"], fields["X Type"], fields["Y Values"]) == ("X/Y/Z plot", "Steps", "5, 9")
    for args, expected in [(["--script", "x/y/z plot", "--x-type", "Steps", "--x-values", "1, nope"], "'nope'"),
                           (["--x-type", "Steps"], "need --script"),
                           (["--script", "loopback"], "no script 'loopback' on txt2img"),
                           (["--script", "prompt matrix", "--script-args", "[1"], "not JSON")]:
        bad = run(sys.executable, "-m", "webui", "txt2img", *common, *args, cwd=data_dir)
        errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
        assert bad.returncode != 0 and "Traceback" not in bad.stderr, bad.stderr
        assert len(errors) == 1 and expected in errors[0], bad.stderr


def test_ray_flag_without_ray_installed_says_how_to_get_it(tmp_path: Path) -> None:
    """`--ray` where Ray is not installed: one line naming the extra, exit 2, no traceback. A
    STAND-IN `ray` module (on PYTHONPATH) that fails to import plays the missing package."""
    (tmp_path / "stand_in").mkdir()
    (tmp_path / "stand_in" / "ray.py").write_text('raise ImportError("No module named ray (stand-in)")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "stand_in")}
    r = subprocess.run([sys.executable, "-m", "webui", "--data-dir", str(tmp_path), "--nowebui", "--ray", "auto"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sd-webui[ray]" in errors[0], r.stderr
