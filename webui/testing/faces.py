"""Test material for face restoration: a drawn face OpenCV's Haar cascade finds, and full-size
GFPGAN weights with random values in the published key layout (the architecture's sizes are fixed:
spandrel detects GFPGAN by its keys and builds the 512 px model)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import save_file


def draw_face(side: int = 256, background: tuple[int, int, int] = (60, 70, 90)) -> Image.Image:
    """A cartoon face (skin oval, eyes, brows, nose, mouth), softened so that it reads as a face."""
    image = Image.new("RGB", (side, side), background)
    d = ImageDraw.Draw(image)
    s = side / 256

    def oval(box: tuple[float, ...], fill: tuple[int, int, int]) -> None:
        d.ellipse([v * s for v in box], fill=fill)

    oval((58, 30, 198, 230), (225, 185, 160))  # face
    oval((78, 95, 118, 115), (255, 255, 255))  # eye whites
    oval((138, 95, 178, 115), (255, 255, 255))
    oval((90, 97, 106, 113), (40, 30, 30))  # pupils
    oval((150, 97, 166, 113), (40, 30, 30))
    d.rectangle([v * s for v in (76, 80, 120, 86)], fill=(90, 60, 50))  # brows
    d.rectangle([v * s for v in (136, 80, 180, 86)], fill=(90, 60, 50))
    d.polygon([(128 * s, 110 * s), (118 * s, 150 * s), (138 * s, 150 * s)], fill=(200, 150, 130))  # nose
    oval((103, 170, 153, 188), (170, 80, 80))  # mouth
    return image.filter(ImageFilter.GaussianBlur(2 * s))


def face_scene(size: tuple[int, int] = (320, 256), face_side: int = 160, at: tuple[int, int] = (40, 48)) -> Image.Image:
    """A plain dark scene with one drawn face at `at`."""
    scene = Image.new("RGB", size, (30, 40, 50))
    scene.paste(draw_face(face_side), at)
    return scene


def write_gfpgan(path: Path, seed: int = 0) -> Path:
    """GFPGAN v1.3/1.4 (GFPGANv1Clean) with random weights, as float16 safetensors (about 175 MB).
    Needs spandrel importable (in tests: under webui.testing.torchvision_stand_in)."""
    from spandrel.architectures.GFPGAN import GFPGAN  # optional dependency (upscalers, test)

    torch.manual_seed(seed)
    model = GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
                   num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}, path)
    return path


def write_codeformer(path: Path, seed: int = 0) -> Path:
    """CodeFormer with random weights, its transformer at small widths (the VQGAN around it has
    fixed sizes), as float16 safetensors. Needs spandrel with `spandrel_extra_arches`."""
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer  # optional dependency (codeformer, test)

    torch.manual_seed(seed)
    model = CodeFormer(dim_embd=64, n_head=8, n_layers=1, codebook_size=32, latent_size=256, connect_list=["32"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}, path)
    return path
