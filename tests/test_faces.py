"""Face restoration: the offline detector finds a drawn face; GFPGAN (full size, random weights,
through spandrel) changes only the pixels around it; restore_faces in a generation, its infotext
and Settings; the Extras' GFPGAN visibility; what is said when weights are missing.

spandrel runs under the torchvision STAND-IN here (see tests/test_spandrel.py and
webui.testing.torchvision_stand_in): this machine has no torchvision built for its torch."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from webui.app import Engine, build_engine
from webui.config import Config
from webui.faces import FaceRestorers, HaarFaces
from webui.faces.restore import _crop_box
from webui.infotext import parse_infotext
from webui.pipeline.request import GenerationRequest
from webui.testing.faces import draw_face, face_scene, write_gfpgan
from webui.testing.torchvision_stand_in import torchvision_stand_in
from webui.upscale.spandrel_arch import Spandrel


@pytest.fixture(scope="module")
def gfpgan_data(tmp_path_factory: pytest.TempPathFactory, checkpoint_store: Path) -> Iterator[Path]:
    """A data folder with the tiny SD1 checkpoint and full-size random GFPGAN weights."""
    with torchvision_stand_in():
        data = tmp_path_factory.mktemp("faces")
        write_gfpgan(data / "models" / "GFPGAN" / "GFPGANv1.4.safetensors")
        (data / "models" / "Stable-diffusion").mkdir(parents=True)
        shutil.copy(checkpoint_store / "sd1.safetensors", data / "models" / "Stable-diffusion" / "sd1.safetensors")
        yield data


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_the_offline_detector_finds_a_drawn_face_and_nothing_in_noise() -> None:
    detect = HaarFaces()
    for side in (128, 256):
        boxes = detect(draw_face(side))
        assert len(boxes) == 1
        x0, _, x1, _ = boxes[0]
        assert x1 - x0 > side * 0.5 and 0 <= x0 < side * 0.3  # most of the drawing, not a corner
    boxes = detect(face_scene(at=(40, 48)))
    assert len(boxes) == 1 and 40 <= boxes[0][0] < 110 and 48 <= boxes[0][1] < 118
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    assert detect(noise) == []


def test_retinaface_decodes_its_anchors_and_keeps_one_box_per_face() -> None:
    """Head outputs as a trained RetinaFace gives them: zero offsets at an anchor are that anchor's
    box; a weaker box overlapping it is suppressed, a separate one kept, low scores dropped."""
    import torch

    from webui.faces import retinaface

    h, w = 128, 160
    priors = retinaface.anchors(h, w)
    assert len(priors) == 2 * (16 * 20 + 8 * 10 + 4 * 5)  # two anchor sizes per position, strides 8, 16, 32

    def index(level: int, row: int, column: int, size: int) -> int:
        before = sum(2 * -(-h // s) * -(-w // s) for s in retinaface.STRIDES[:level])
        return before + (row * -(-w // retinaface.STRIDES[level]) + column) * 2 + size

    offsets, scores = torch.zeros(len(priors), 4), torch.full((len(priors),), 0.1)
    face, beside, apart = index(0, 5, 7, 1), index(0, 5, 8, 1), index(1, 5, 2, 1)  # 32, 32 and 128 px anchors
    scores[face], scores[beside], scores[apart] = 0.95, 0.9, 0.85
    offsets[apart] = torch.tensor([0.5, 0.0, 0.0, 0.0])  # its centre moved by 0.5 x 0.1 x 128 px
    found = retinaface.faces(offsets, scores, priors, h, w)
    assert len(found) == 2
    np.testing.assert_allclose(found[0], [44, 28, 76, 60, 0.95], atol=1e-4)  # centre (60, 44), 32 px
    np.testing.assert_allclose(found[1], [40 + 6.4 - 64, 88 - 64, 40 + 6.4 + 64, 88 + 64, 0.85], atol=1e-4)


def test_retinaface_from_the_models_folder_else_the_cascade(tmp_path: Path) -> None:
    """facexlib's detection_Resnet50_Final.pth (random weights here, in its layout with the
    `module.` prefix) in models/facedetect/ is the restorers' detector once it is there; a file that
    is not that network is named."""
    import torch

    from webui.faces.retinaface import FILE, RetinaFace, RetinaFaces

    faces = FaceRestorers(tmp_path / "models", Spandrel())
    assert isinstance(faces.detector.detector(), HaarFaces)
    folder = tmp_path / "models" / "facedetect"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    net = RetinaFace()
    assert sum(p.numel() for p in net.parameters()) == 27_293_600  # RetinaFace ResNet-50's size
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, folder / FILE)
    detector = faces.detector.detector()
    assert isinstance(detector, RetinaFaces)
    scene = face_scene((320, 256))
    boxes = faces.detector(scene)  # random weights: whatever they find, as boxes inside the picture
    assert all(0 <= b[0] < b[2] <= 320 and 0 <= b[1] < b[3] <= 256 for b in boxes)
    torch.save({"body.conv1.weight": torch.zeros(1)}, folder / FILE)
    with pytest.raises(ValueError, match=f"face detector {FILE} is not RetinaFace ResNet-50"):
        FaceRestorers(tmp_path / "models", Spandrel()).detector(scene)


def test_gfpgan_changes_only_the_pixels_around_the_face(gfpgan_data: Path) -> None:
    faces = FaceRestorers(gfpgan_data / "models", Spandrel())
    assert faces.names() == ["GFPGAN"] and faces.pick("CodeFormer") == "GFPGAN"  # the one present
    scene = face_scene()
    box = faces.detector(scene)[0]
    restored = faces.restore(scene, "GFPGAN")
    changed = np.abs(_px(restored) - _px(scene)).max(axis=2) > 0
    x0, y0, x1, y1 = _crop_box(box, scene.size)
    outside = changed.copy()
    outside[y0:y1, x0:x1] = False
    assert changed[y0:y1, x0:x1].mean() > 0.5 and not outside.any()
    half = faces.restore(scene, "GFPGAN", visibility=0.5)
    inside = (slice(y0 + 30, y1 - 30), slice(x0 + 30, x1 - 30))  # where the feathered mask is full
    d_half, d_full = (np.abs(_px(im)[inside] - _px(scene)[inside]).mean() for im in (half, restored))
    assert 0.3 * d_full < d_half < 0.7 * d_full
    assert faces.restore(scene, "GFPGAN", visibility=0) is scene
    again = faces.restore(scene, "GFPGAN")
    assert np.array_equal(_px(again), _px(restored))  # the StyleGAN noise is fixed: same face, same result
    plain = Image.new("RGB", (256, 256), (90, 90, 90))
    assert faces.restore(plain, "GFPGAN") is plain  # no face found: nothing to do


def _engine(data: Path) -> Engine:
    return build_engine(Config(data_dir=data, dtype="float32"))


def test_restore_faces_in_a_generation(gfpgan_data: Path) -> None:
    """img2img at denoising strength 0 gives back its input, a scene with a face: with
    restore_faces the face is restored, the rest stays, and the infotext names the restorer."""
    engine = _engine(gfpgan_data)  # the module's fixture keeps the torchvision stand-in in place
    scene = face_scene()
    base = {"prompt": "a portrait", "steps": 2, "width": 320, "height": 256, "seed": 3, "sampler_name": "Euler",
            "init_images": (scene,), "denoising_strength": 0.0, "save_images": False}
    plain = engine.runner.generate(GenerationRequest(**base))
    restored = engine.runner.generate(GenerationRequest(**base, restore_faces=True))
    assert np.array_equal(_px(plain.images[0]), _px(scene))
    assert not np.array_equal(_px(restored.images[0]), _px(scene))
    assert parse_infotext(restored.infotexts[0])["Face restoration"] == "GFPGAN"
    assert "Face restoration" not in parse_infotext(plain.infotexts[0])
    engine.settings.update({"face_restoration": True})
    from_settings = engine.runner.generate(GenerationRequest(**base))
    assert np.array_equal(_px(from_settings.images[0]), _px(restored.images[0]))
    off = engine.runner.generate(GenerationRequest(**base, restore_faces=False))
    assert np.array_equal(_px(off.images[0]), _px(scene))


def test_extras_gfpgan_visibility(gfpgan_data: Path) -> None:
    from webui import extras

    engine = _engine(gfpgan_data)
    scene = face_scene()
    how = extras.Upscale("None", scale=1.0, gfpgan_visibility=1.0)
    result = extras.run(engine, [scene], how, save=False)
    assert result.images[0].size == scene.size and not np.array_equal(_px(result.images[0]), _px(scene))
    assert "GFPGAN visibility: 1" in result.infotexts[0]
    with pytest.raises(ValueError, match=r"codeformer_visibility: no CodeFormer weights: put .*Codeformer"):
        extras.run(engine, [scene], extras.Upscale("None", scale=1.0, codeformer_visibility=0.5), save=False)


def test_codeformer_and_its_weight(gfpgan_data: Path, tmp_path: Path) -> None:
    """CodeFormer (the codeformer extra): preferred by the Settings' default when present; its
    weight changes the result; still only around the face."""
    pytest.importorskip("spandrel_extra_arches")
    from webui.testing.faces import write_codeformer

    models = tmp_path / "models"
    shutil.copytree(gfpgan_data / "models" / "GFPGAN", models / "GFPGAN")
    write_codeformer(models / "Codeformer" / "codeformer-v0.1.0.safetensors")
    faces = FaceRestorers(models, Spandrel())
    assert faces.names() == ["GFPGAN", "CodeFormer"] and faces.pick("CodeFormer") == "CodeFormer"
    scene = face_scene()
    strong, faithful = (faces.restore(scene, "CodeFormer", weight=w) for w in (0.0, 1.0))
    assert not np.array_equal(_px(strong), _px(faithful))
    x0, y0, x1, y1 = _crop_box(faces.detector(scene)[0], scene.size)
    for image in (strong, faithful):
        changed = np.abs(_px(image) - _px(scene)).max(axis=2) > 0
        changed[y0:y1, x0:x1] = False
        assert not changed.any()


def test_missing_weights_are_named_before_the_job(tmp_path: Path, checkpoint_store: Path) -> None:
    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(checkpoint_store / "sd1.safetensors", tmp_path / "models" / "Stable-diffusion" / "sd1.safetensors")
    engine = _engine(tmp_path)
    assert engine.faces.names() == []
    with pytest.raises(ValueError, match=r"restore_faces: no face restorer here: put GFPGAN weights in .*GFPGAN"):
        engine.check(GenerationRequest(prompt="x", restore_faces=True))
    engine.check(GenerationRequest(prompt="x", restore_faces=False))


def test_the_infotext_restores_the_choice() -> None:
    from webui.infotext import infotext_to_fields

    fields = infotext_to_fields(parse_infotext("a face\nSteps: 4, Seed: 1, Face restoration: CodeFormer"))
    assert fields["restore_faces"] is True and fields["face_restoration_model"] == "CodeFormer"
    assert "restore_faces" not in infotext_to_fields(parse_infotext("a face\nSteps: 4, Seed: 1"))
