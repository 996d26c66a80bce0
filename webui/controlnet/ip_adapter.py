"""IP-Adapter in ControlNet units: an image as a prompt.

- The adapter file (`ip-adapter_sd15.safetensors`, `ip-adapter-plus_sd15`, `ip-adapter_sdxl`, ...,
  in `models/ControlNet/`: `image_proj.*` and `ip_adapter.N.to_{k,v}_ip.*` keys, as h94's files
  have them) is converted with diffusers' own converters on the loaded UNet: an image projection
  and one IP attention processor per cross-attention layer.
- The image encoder is a CLIP vision model from `models/clip_vision/` (a transformers-layout
  `.safetensors`, as ComfyUI users have `CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors` and
  `CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors`); its configuration is read from the weights'
  shapes, and the one whose width the adapter takes is used. Plain adapters read the projected
  image embedding, "plus" ones the penultimate layer's tokens.
- Per sampling run the processors and the projection are installed on the UNet and removed after
  it (`installed`), and each model call gets the image embeddings for its rows (zeros, or the
  encoding of a black image for "plus", on the negative prompt's rows), with the unit's weight
  inside its step range and 0 outside.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from webui.models.errors import ModelError

if TYPE_CHECKING:
    import torch

    from webui.models.load import ModelBundle

HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}  # CLIP ViT-B, L, H, bigG: not readable from the shapes


def is_ip_adapter(state: dict[str, Any]) -> bool:
    return any(k.startswith("image_proj.") for k in state) and any(k.startswith("ip_adapter.") for k in state)


@dataclass
class IPAdapterModel:
    name: str
    image_proj: torch.nn.Module
    processors: dict[str, torch.nn.Module]  # attention-processor name -> its IP processor
    embed_width: int  # what the projection takes: the CLIP projection's width, or the hidden width (plus)
    plus: bool  # reads the penultimate hidden states, not the projected embedding


def build(state: dict[str, torch.Tensor], name: str, bundle: ModelBundle) -> IPAdapterModel:
    import torch
    from diffusers.models.embeddings import ImageProjection

    grouped: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
    for k, v in state.items():
        head, _, rest = k.partition(".")
        if head in grouped:
            grouped[head][rest] = v
    unet = bundle.unet
    try:
        proj = unet._convert_ip_adapter_image_proj_to_diffusers(grouped["image_proj"], low_cpu_mem_usage=False)
        procs = unet._convert_ip_adapter_attn_to_diffusers([grouped], low_cpu_mem_usage=False)
    except (KeyError, RuntimeError, ValueError) as err:
        raise ModelError(f"IP-Adapter {name} does not fit {bundle.model_name} ({bundle.family.label}): "
                         f"{str(err).splitlines()[0]} (an IP-Adapter is made for one model family)") from None
    ip = {n: p for n, p in procs.items() if hasattr(p, "to_k_ip")}
    rt = bundle.runtime
    for module in (proj, *ip.values()):
        module.to(device=rt.device, dtype=rt.dtype).eval().requires_grad_(False)
    plus = not isinstance(proj, ImageProjection)
    first = next(m for m in proj.modules() if isinstance(m, torch.nn.Linear))  # what the projection reads
    return IPAdapterModel(name, proj, ip, first.in_features, plus)


class ClipVision:
    """The CLIP vision encoders of `models/clip_vision/`, built from their weights on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, str], Any] = {}

    def files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.rglob("*.safetensors") if p.is_file())

    def encoder_for(self, adapter: IPAdapterModel, device: torch.device) -> Any:
        """The encoder whose output the adapter takes (ModelError naming the folder when none does)."""
        widths = []
        for path in self.files():
            hidden, projection = _widths(path)
            widths.append(f"{path.name}: {hidden}/{projection}")
            if (hidden if adapter.plus else projection) == adapter.embed_width:
                return self._load(path, device)
        raise ModelError(f"IP-Adapter {adapter.name} needs a CLIP vision model giving "
                         f"{adapter.embed_width}-wide {'tokens' if adapter.plus else 'embeddings'} in "
                         f"{self.folder} (ViT-H/14 for the SD 1.5 and most SDXL adapters, ViT-bigG/14 for "
                         f"ip-adapter_sdxl); found: {', '.join(widths) or 'none'}")

    def _load(self, path: Path, device: torch.device) -> Any:
        import torch
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        from webui.models.load import load_meta_module
        from webui.models.readers import read_state_dict

        key = (str(path), str(device))
        with self._lock:
            if key not in self._loaded:
                state = read_state_dict(path)
                state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
                hidden = state["vision_model.embeddings.class_embedding"].shape[0]
                patch = state["vision_model.embeddings.patch_embedding.weight"].shape[-1]
                positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
                layers = len({k.split(".")[3] for k in state if k.startswith("vision_model.encoder.layers.")})
                config = CLIPVisionConfig(
                    hidden_size=hidden, intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                    projection_dim=state["visual_projection.weight"].shape[0], num_hidden_layers=layers,
                    num_attention_heads=HEADS.get(hidden, max(1, hidden // 64)), patch_size=patch,
                    image_size=round((positions - 1) ** 0.5) * patch, hidden_act="gelu", layer_norm_eps=1e-5)
                with torch.device("meta"):
                    model = CLIPVisionModelWithProjection(config)
                try:
                    self._loaded[key] = load_meta_module(model, state, device, torch.float32)
                except ModelError as err:
                    raise ModelError(f"{path.name}: not a CLIP vision model ({err})") from None
            return self._loaded[key]


def _widths(path: Path) -> tuple[int, int]:
    """(hidden, projection) widths of a CLIP vision file, from its header (no weights read)."""
    from webui.models.readers import safetensors_shapes  # torch comes with it: not at start-up

    shapes = safetensors_shapes(path)
    return (shapes.get("vision_model.embeddings.class_embedding", (0,))[0],
            shapes.get("visual_projection.weight", (0,))[0])


def embeddings(adapter: IPAdapterModel, encoder: Any, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """(the image's, the negative's) embeddings as the adapter's projection takes them, [1, ...]."""
    import torch
    from transformers import CLIPImageProcessor

    size = encoder.config.image_size  # CLIP's own preprocessing (shorter side, centre crop, CLIP's mean and std)
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    def pixels(*images: Image.Image) -> torch.Tensor:
        return processor(images=[i.convert("RGB") for i in images], return_tensors="pt").pixel_values.to(encoder.device)

    with torch.no_grad():
        if not adapter.plus:
            embeds = encoder(pixel_values=pixels(image)).image_embeds
            return embeds[:, None], torch.zeros_like(embeds)[:, None]
        black = Image.new("RGB", (size, size))
        both = encoder(pixel_values=pixels(image, black), output_hidden_states=True).hidden_states[-2]
        return both[:1, None], both[1:, None]  # [1, images, tokens, width], as the Resampler takes them


def joined(adapters: list[IPAdapterModel]) -> dict[str, Any]:
    """Each cross-attention layer's IP processor for the adapters together: one branch per adapter,
    in order, as diffusers loads several (their key/value projections, not copies)."""
    return {name: _joined([a.processors[name] for a in adapters]) for name in adapters[0].processors}


@contextmanager
def installed(unet: Any, adapters: list[IPAdapterModel], layers: dict[str, Any]) -> Iterator[None]:
    """The `joined` processors and the adapters' projections on `unet` for the block, then the UNet
    as it was."""
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    before = unet.attn_processors
    hid_proj, hid_type = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
    unet.set_attn_processor({**before, **layers})
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([a.image_proj for a in adapters])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    try:
        yield
    finally:  # the projection first: a "plus" one has attention layers of its own, which would count
        unet.encoder_hid_proj = hid_proj
        unet.config.encoder_hid_dim_type = hid_type
        unet.set_attn_processor(before)


def _joined(processors: list[Any]) -> Any:
    """One layer's IP processors as one with a branch each (their key/value projections, not copies)."""
    import torch

    if len(processors) == 1:
        return processors[0]
    first = processors[0]
    joined = type(first)(first.hidden_size, first.cross_attention_dim,
                         num_tokens=[n for p in processors for n in p.num_tokens])
    joined.to_k_ip = torch.nn.ModuleList([m for p in processors for m in p.to_k_ip])
    joined.to_v_ip = torch.nn.ModuleList([m for p in processors for m in p.to_v_ip])
    return joined


def set_scales(layers: dict[str, Any], scales: list[float]) -> None:
    """Each adapter's weight (in the order `joined` got them) in every layer."""
    for processor in layers.values():
        processor.scale = list(scales)
