"""What each model family needs that its weights do not say (shipped, so loading is offline).

Sizes (channels, depth, widths) are read from the tensors by `detect`; this table holds the
rest: which text encoders and how their outputs are used, head layout, latent scale, noise
schedule, default image size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

TextEncoderKind = Literal["clip", "openclip", "t5"]
# What denoises: the SD UNet, SD3's MMDiT (a diffusers SD3Transformer2DModel), Flux's transformer.
DenoiserKind = Literal["unet", "mmdit", "flux"]

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # the SDXL refiner's defaults
# Least-squares fits of RGB on the 4 latent channels, per VAE latent space (community-measured).
SD_PREVIEW = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))
SDXL_PREVIEW = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                (-0.3165, -0.2492, -0.2188))


@dataclass(frozen=True)
class TextEncoderSpec:
    kind: TextEncoderKind
    prefix: str  # key prefix in the single-file checkpoint
    hidden_act: str  # CLIP-L uses quick_gelu, OpenCLIP gelu
    pad_token: str  # OpenCLIP pads with "!" (id 0), CLIP-L with the end token
    # Which hidden state feeds the UNet at clip skip 1: 1 = last layer, 2 = penultimate.
    default_layer_from_end: int
    final_layer_norm: bool  # apply the final layer norm to that hidden state
    pooled: bool = False  # provides the pooled, projected embedding (SDXL)
    projected: bool = True  # the pooled vector passes the text projection (Flux takes CLIP-L's unprojected)
    # Index into an SDXL embedding's roles ("clip_l", "clip_g") when it differs from this
    # encoder's position in the family (the refiner's only encoder is SDXL's second, bigG).
    embedding_slot: int | None = None
    # SD3: both CLIPs give pooled vectors (concatenated); only the hidden states of encoders with
    # `context` feed the denoiser's token sequence.
    context: bool = True
    optional: bool = False  # the file may lack it (SD3's T5: its part of the context is zeros then)
    max_tokens: int = 77  # a T5 prompt's length, padded (CLIP's are 75-token chunks)


@dataclass(frozen=True)
class FamilySpec:
    name: str  # "sd1", "sd2", "sdxl", "sdxl_refiner"
    label: str
    text_encoders: tuple[TextEncoderSpec, ...]
    default_size: int
    latent_scaling_factor: float
    # UNet heads: SD1 uses a fixed head count, later families a fixed head width.
    fixed_heads: int | None
    head_dim: int | None
    upcast_attention: bool
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    # Size conditioning ("text_time" added embedding): how many time ids the UNet takes per image.
    # 0 = none; SDXL: 6 = [orig_h, orig_w, crop_top, crop_left, target_h, target_w];
    # SDXL refiner: 5 = [orig_h, orig_w, crop_top, crop_left, aesthetic_score].
    num_time_ids: int = 0
    aesthetic_score: bool = False  # the last time id is an aesthetic score (6.0 positive, 2.5 negative)
    # Which latent space the VAE encodes to ("sd" or "sdxl"): a refiner must share it. What
    # depends on the latent space is data here, so no code tests a family's name:
    latent_space: str = "sd"
    latent_channels: int = 4
    preview_factors: tuple[tuple[float, float, float], ...] = SD_PREVIEW  # RGB per latent channel (linear)
    taesd_stem: str = "taesd_decoder"  # models/VAE-approx/<stem>.safetensors|.pth
    ays_sigmas: str = "sd1"  # which published Align Your Steps list (webui.samplers.schedules.AYS_SIGMAS)
    denoiser: DenoiserKind = "unet"
    # Flow matching (SD3): the model predicts velocity, x_t = (1 - t) x0 + t noise, sampled with
    # sigma = t; `flow_shift` bends the schedule toward high noise (SD3's default 3.0).
    flow: bool = False
    flow_shift: float = 1.0
    # Flux.1 dev: the shift grows with the image's token count, exp(mu) with mu from 0.5 at 256
    # tokens to 1.15 at 4096 (linear, extrapolated beyond); schnell (no guidance input) keeps 1.
    flow_dynamic_shift: bool = False
    latent_shift: float = 0.0  # the VAE's shift factor: latents = (mean - shift) * scale
    packed_patch: int = 1  # the denoiser takes the latent packed in n x n patches as channels (Flux: 2)
    # a separate VAE file's names for this family in models/VAE (stems; also any starting with the family's name)
    vae_names: tuple[str, ...] = ()
    # Sampler names that make sense for the family (None: all). A flow model takes the
    # deterministic ones and Euler a (its own flow form); the other ancestral / SDE samplers'
    # noise injection assumes x = x0 + sigma * noise.
    samplers: tuple[str, ...] | None = None

    def time_ids(self, width: int, height: int) -> tuple[list[float] | None, list[float] | None]:
        """The size conditioning rows (positive, negative) for an image of this size: original size,
        crop top-left at 0, then the target size (SDXL) or the aesthetic score (refiner); None when
        the family takes none, and a None negative when it is the positive one."""
        if self.aesthetic_score:
            return ([height, width, 0, 0, AESTHETIC_SCORE], [height, width, 0, 0, NEGATIVE_AESTHETIC_SCORE])
        if self.num_time_ids == 6:
            return [height, width, 0, 0, height, width], None
        return None, None


CLIP_L = TextEncoderSpec(
    kind="clip",
    prefix="cond_stage_model.transformer.",
    hidden_act="quick_gelu",
    pad_token="<|endoftext|>",
    default_layer_from_end=1,
    final_layer_norm=True,
)

SD1 = FamilySpec(
    name="sd1",
    label="SD 1.x",
    text_encoders=(CLIP_L,),
    default_size=512,
    latent_scaling_factor=0.18215,
    fixed_heads=8,
    head_dim=None,
    upcast_attention=False,
)

SD2 = FamilySpec(
    name="sd2",
    label="SD 2.x",
    text_encoders=(
        TextEncoderSpec(
            kind="openclip",
            prefix="cond_stage_model.model.",
            hidden_act="gelu",
            pad_token="!",
            default_layer_from_end=2,
            final_layer_norm=True,
        ),
    ),
    default_size=768,
    latent_scaling_factor=0.18215,
    fixed_heads=None,
    head_dim=64,
    upcast_attention=True,
)

SDXL = FamilySpec(
    name="sdxl",
    label="SDXL",
    text_encoders=(
        TextEncoderSpec(
            kind="clip",
            prefix="conditioner.embedders.0.transformer.",
            hidden_act="quick_gelu",
            pad_token="<|endoftext|>",
            default_layer_from_end=2,
            final_layer_norm=False,
        ),
        TextEncoderSpec(
            kind="openclip",
            prefix="conditioner.embedders.1.model.",
            hidden_act="gelu",
            pad_token="!",
            default_layer_from_end=2,
            final_layer_norm=False,
            pooled=True,
        ),
    ),
    default_size=1024,
    latent_scaling_factor=0.13025,
    fixed_heads=None,
    head_dim=64,
    upcast_attention=False,
    num_time_ids=6,
    latent_space="sdxl",
    preview_factors=SDXL_PREVIEW,
    taesd_stem="taesdxl_decoder",
    ays_sigmas="sdxl",
)

# The SDXL refiner: one text encoder, OpenCLIP bigG at `conditioner.embedders.0.model.`, used as
# in SDXL base (penultimate hidden state without the final layer norm, plus the projected pooled
# output); the UNet's size conditioning ends with an aesthetic score instead of the target size.
SDXL_REFINER = FamilySpec(
    name="sdxl_refiner",
    label="SDXL Refiner",
    text_encoders=(
        TextEncoderSpec(
            kind="openclip",
            prefix="conditioner.embedders.0.model.",
            hidden_act="gelu",
            pad_token="!",
            default_layer_from_end=2,
            final_layer_norm=False,
            pooled=True,
            embedding_slot=1,  # an SDXL embedding's "clip_g" vectors
        ),
    ),
    default_size=1024,
    latent_scaling_factor=0.13025,
    fixed_heads=None,
    head_dim=64,
    upcast_attention=False,
    num_time_ids=5,
    aesthetic_score=True,
    latent_space="sdxl",
    preview_factors=SDXL_PREVIEW,
    taesd_stem="taesdxl_decoder",
    ays_sigmas="sdxl",
)

# The text encoders of the transformer families, under the prefixes an all-in-one file has them
# (separate files are read into the same places): CLIP-L as SD3 and Flux use it, and T5-XXL.
CLIP_L_SEPARATE = TextEncoderSpec(kind="clip", prefix="text_encoders.clip_l.transformer.", hidden_act="quick_gelu",
                                  pad_token="<|endoftext|>", default_layer_from_end=1, final_layer_norm=True,
                                  pooled=True)
T5XXL = TextEncoderSpec(kind="t5", prefix="text_encoders.t5xxl.transformer.", hidden_act="gelu_new", pad_token="<pad>",
                        default_layer_from_end=1, final_layer_norm=True, max_tokens=512)

# A flow model's ODE, dx/dt = (x - denoised) / t, has the form of the SD ones in sigma = t, so the
# deterministic solvers (UniPC and DPM++ 2M in log t) run on it unchanged; Euler a has a flow form.
FLOW_SAMPLERS = ("Euler a", "Euler", "Heun", "LMS", "DPM2", "DPM++ 2M", "UniPC")

# Stable Diffusion 3 / 3.5 (Medium, Large, Large Turbo) in one file, the layout Stability ships:
# MMDiT under `model.diffusion_model.`, CLIP-L, CLIP-G and (optionally) T5-XXL under
# `text_encoders.`, a 16-channel VAE. Both CLIPs give their penultimate hidden states (no final
# norm) side by side, padded with zeros to T5's width, then T5's 256 tokens follow; the pooled
# vector is CLIP-L's and CLIP-G's projected end tokens together.
SD3 = FamilySpec(
    name="sd3",
    label="SD 3.x",
    text_encoders=(
        replace(CLIP_L_SEPARATE, default_layer_from_end=2, final_layer_norm=False),
        TextEncoderSpec(kind="clip", prefix="text_encoders.clip_g.transformer.", hidden_act="gelu", pad_token="!",
                        default_layer_from_end=2, final_layer_norm=False, pooled=True, embedding_slot=1),
        replace(T5XXL, optional=True, max_tokens=256),
    ),
    default_size=1024,
    latent_scaling_factor=1.5305,
    latent_shift=0.0609,
    fixed_heads=None,
    head_dim=64,
    upcast_attention=False,
    latent_space="sd3",
    latent_channels=16,
    preview_factors=(),  # none published under a licence we can ship: the first three channels, normalised
    taesd_stem="taesd3_decoder",
    ays_sigmas="sdxl",
    denoiser="mmdit",
    flow=True,
    flow_shift=3.0,
    samplers=FLOW_SAMPLERS,
)

# Flux.1 dev / schnell and fine-tunes: the transformer alone in Black Forest Labs' layout (maybe
# under `model.diffusion_model.`), the VAE `ae.safetensors` in models/VAE, CLIP-L (its pooled vector
# only) and T5-XXL (the whole token sequence, 512 tokens) as files of their own or in the checkpoint.
# dev is guidance-distilled: its "Distilled CFG Scale" is an input of the model, not a second pass.
FLUX = FamilySpec(
    name="flux",
    label="Flux.1",
    text_encoders=(replace(CLIP_L_SEPARATE, projected=False, context=False), T5XXL),
    default_size=1024,
    latent_scaling_factor=0.3611,
    latent_shift=0.1159,
    fixed_heads=None,
    head_dim=128,
    upcast_attention=False,
    latent_space="flux",
    latent_channels=16,
    preview_factors=(),
    taesd_stem="taef1_decoder",
    ays_sigmas="sdxl",
    denoiser="flux",
    packed_patch=2,
    vae_names=("ae",),
    flow=True,
    flow_shift=1.0,
    flow_dynamic_shift=True,
    samplers=FLOW_SAMPLERS,
)

FAMILIES = {f.name: f for f in (SD1, SD2, SDXL, SDXL_REFINER, SD3, FLUX)}
