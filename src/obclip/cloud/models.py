"""Model configurations and loading (torch side).

A *model directory* is a diffusers pipeline layout (``model_index.json``,
``text_encoder/``, ``tokenizer/``, ``unet/``, ``vae/``, ``scheduler/``), the
layout of CompVis/stable-diffusion-v1-4 and nota-ai/bk-sdm-small alike; an
SDXL-family directory (stabilityai/stable-diffusion-xl-base-1.0,
etri-vilab/koala-700m) adds ``text_encoder_2/`` and ``tokenizer_2/``. The
cloud reads text encoder(s) + UNet + scheduler config (+ the VAE config, for
the latent shape); the export reads the device's text encoder(s), UNet and VAE.
What the UNet is conditioned on besides the text (its family) is read from its
config into a ``runtime.conditioning.Conditioning``.

Named UNet configurations reproduce SD-v1.4, BK-SDM-Small/Tiny, SDXL,
Koala-700m/1B and LCM-SDXL exactly (the published parameter counts are checked
in tests, docs/models.md) and give small models of the same topology for tests
and the embedded default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizerFast
from transformers.utils import logging as transformers_logging

from obclip.runtime.conditioning import TEXT_EMBEDS, Conditioning
from obclip.runtime.errors import ArtifactError, InputError
from obclip.runtime.geometry import LatentGeometry
from obclip.runtime.locations import clip_bpe_dir, embedded_models_dir
from obclip.runtime.tokenizer import PromptTooLongError

# Loading bars for a handful of files are noise in a service's log.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()

CLIP_BPE_DIR = clip_bpe_dir()

# SD-v1.4's scheduler_config.json (a PNDM config; the runtime reads it as
# DPM-Solver++ the way DPMSolverMultistepScheduler.from_config does).
SD14_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json (Euler; read as DPM-Solver++ too).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

_SD14_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

# The small pair: SD-v1.4's block structure (attention in the outer stages,
# none in the innermost one) at a width a CPU runs in milliseconds.
_MINI_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    cross_attention_dim=64,
    # diffusers reads this as the number of heads (SD-v1.4's 8 heads are 40-320
    # wide). 2 heads of 16/32 channels here: 8 heads of 4 channels made a CPU
    # training step much slower (docs/benchmarks.md).
    attention_head_dim=2,
    norm_num_groups=8,
)


def _bk_small(config: dict) -> dict:
    """BK-SDM-Small: one res+attention pair fewer per stage, no mid block."""
    return {**config, "layers_per_block": 1, "mid_block_type": None}


# stabilityai/stable-diffusion-xl-base-1.0's UNet: no attention in the first stage (DownBlock2D first),
# transformer depth 2 and 10 in the others (and 10 in the mid block), pooled text + size conditioning.
_SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,   # 1280 pooled + 6 x 256 time ids
    norm_num_groups=32,
)

# SDXL's topology (stages, transformer depths, added conditions) at a width a CPU runs in milliseconds.
_SDXL_TINY_UNET = {
    **_SDXL_UNET, "sample_size": 16, "block_out_channels": (32, 64, 64), "attention_head_dim": (2, 2, 4),
    "cross_attention_dim": 64, "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8,
    "norm_num_groups": 8,
}


def _koala(config: dict, depth: int, mid_block: bool) -> dict:
    """KOALA (etri-vilab): one res+attention pair per encoder stage (two per decoder stage), the deepest
    stage's transformer depth cut from 10 to ``depth``, and (700m) no mid block."""
    out = {**config, "layers_per_block": 1, "transformer_layers_per_block": (1, 2, depth)}
    return out if mid_block else {**out, "mid_block_type": None}


def _lcm(config: dict, dim: int) -> dict:
    """latent-consistency/lcm-sdxl: SDXL's UNet with the guidance scale embedded (time_cond_proj_dim)."""
    return {**config, "time_cond_proj_dim": dim}


UNET_CONFIGS: dict[str, dict] = {
    "sd-v1.4": _SD14_UNET,
    "bk-sdm-small": _bk_small(_SD14_UNET),
    # BK-SDM-Tiny additionally drops the innermost (attention-free) stage.
    "bk-sdm-tiny": {
        **_bk_small(_SD14_UNET),
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3,
        "up_block_types": ("CrossAttnUpBlock2D",) * 3,
    },
    "mini": _MINI_UNET,
    "mini-small": _bk_small(_MINI_UNET),
    # SD-v1.4's topology and heads at channels 32-128: a mid-size stand-in that a CPU exports and
    # times in minutes (benchmarks/cloud_engines.py --write-narrow-sd).
    "sd-v1.4-narrow": {**_SD14_UNET, "block_out_channels": (32, 64, 128, 128)},
    "sdxl": _SDXL_UNET,
    "koala-700m": _koala(_SDXL_UNET, 5, mid_block=False),
    "koala-1b": _koala(_SDXL_UNET, 6, mid_block=True),
    "lcm-sdxl": _lcm(_SDXL_UNET, 256),
    "sdxl-tiny": _SDXL_TINY_UNET,
    "koala-700m-tiny": _koala(_SDXL_TINY_UNET, 5, mid_block=False),
    "koala-1b-tiny": _koala(_SDXL_TINY_UNET, 6, mid_block=True),
    "lcm-sdxl-tiny": _lcm(_SDXL_TINY_UNET, 16),
}

TEXT_CONFIGS: dict[str, dict] = {
    # CLIP ViT-L/14 text tower, as in SD-v1.4.
    "clip-vit-l-14": dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=768,
    ),
    # SD-v1.4's text tower cut to 2 layers, for sd-v1.4-narrow.
    "clip-l-2": dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=768,
    ),
    "mini": dict(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=64,
    ),
    # OpenCLIP ViT-bigG/14's text tower: SDXL's text_encoder_2 (with its 1280-d projection).
    "openclip-bigg-14": dict(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
        projection_dim=1280,
    ),
    # The two SDXL towers at 32 channels (3 layers: the penultimate hidden state is not the input's).
    "clip-l-tiny": dict(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=32,
    ),
    "openclip-bigg-tiny": dict(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
        projection_dim=32,
    ),
}

VAE_CONFIGS: dict[str, dict] = {
    "sd": dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
        sample_size=512, scaling_factor=0.18215,
    ),
    # SDXL's VAE: SD's structure, its own latent scale, 1024 px.
    "sdxl": dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
        sample_size=1024, scaling_factor=0.13025, force_upcast=True,
    ),
    # 4x downsampling: 64x64 RGB <-> 4x16x16 latents.
    "mini": dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
        sample_size=64, scaling_factor=0.18215,
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """A full model directory described by the names of its parts (``text_2``: SDXL's second encoder)."""

    unet: str
    text: str
    vae: str
    text_2: str | None = None


_SDXL_TEXT = dict(text="clip-vit-l-14", vae="sdxl", text_2="openclip-bigg-14")
_SDXL_TINY_TEXT = dict(text="clip-l-tiny", vae="mini", text_2="openclip-bigg-tiny")

MODEL_SPECS: dict[str, ModelSpec] = {
    "sd-v1.4": ModelSpec("sd-v1.4", "clip-vit-l-14", "sd"),
    "bk-sdm-small": ModelSpec("bk-sdm-small", "clip-vit-l-14", "sd"),
    "bk-sdm-tiny": ModelSpec("bk-sdm-tiny", "clip-vit-l-14", "sd"),
    "sd-v1.4-narrow": ModelSpec("sd-v1.4-narrow", "clip-l-2", "sd"),
    "mini": ModelSpec("mini", "mini", "mini"),
    "mini-small": ModelSpec("mini-small", "mini", "mini"),
    "sdxl": ModelSpec("sdxl", **_SDXL_TEXT),
    "koala-700m": ModelSpec("koala-700m", **_SDXL_TEXT),
    "koala-1b": ModelSpec("koala-1b", **_SDXL_TEXT),
    "lcm-sdxl": ModelSpec("lcm-sdxl", **_SDXL_TEXT),
    "sdxl-tiny": ModelSpec("sdxl-tiny", **_SDXL_TINY_TEXT),
    "koala-700m-tiny": ModelSpec("koala-700m-tiny", **_SDXL_TINY_TEXT),
    "koala-1b-tiny": ModelSpec("koala-1b-tiny", **_SDXL_TINY_TEXT),
    "lcm-sdxl-tiny": ModelSpec("lcm-sdxl-tiny", **_SDXL_TINY_TEXT),
}


def _named(table: dict[str, dict], kind: str, name: str) -> dict:
    if name not in table:
        raise InputError(f"unknown {kind} config {name!r}; known: {', '.join(sorted(table))}")
    return dict(table[name])


def build_unet(name: str) -> UNet2DConditionModel:
    return UNet2DConditionModel(**_named(UNET_CONFIGS, "UNet", name))


def build_text_encoder(name: str) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**_named(TEXT_CONFIGS, "text encoder", name)))


def build_text_encoder_2(name: str) -> CLIPTextModelWithProjection:
    """SDXL's second text encoder: a CLIP text tower with its projection (the pooled ``text_embeds``)."""
    return CLIPTextModelWithProjection(CLIPTextConfig(**_named(TEXT_CONFIGS, "text encoder", name)))


def build_vae(name: str) -> AutoencoderKL:
    return AutoencoderKL(**_named(VAE_CONFIGS, "VAE", name))


def load_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizerFast:
    """The real CLIP BPE tokenizer from the shipped vocabulary.

    The files go positionally: with transformers 5, CLIPTokenizer(vocab_file=..,
    merges_file=..) silently builds an empty tokenizer. Padding with
    <|endoftext|> is what SD-v1.4's tokenizer does; SDXL's tokenizer_2 pads with "!".
    """
    tok = CLIPTokenizerFast(
        str(CLIP_BPE_DIR / "vocab.json"), str(CLIP_BPE_DIR / "merges.txt"),
        pad_token=pad_token, model_max_length=77,
    )
    if len(tok) != 49408:
        raise ArtifactError(f"CLIP tokenizer from {CLIP_BPE_DIR} has {len(tok)} tokens, expected 49408")
    return tok


def write_random_model(spec_name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a diffusers-layout model directory with random weights.

    Deterministic in ``seed``. Used by the tests (fast, and the same code
    paths as trained weights; its images are noise). A spec with a second text
    encoder (SDXL, Koala, LCM-SDXL) is written as diffusers' SDXL pipeline.
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    spec = MODEL_SPECS[spec_name] if spec_name in MODEL_SPECS else None
    if spec is None:
        raise InputError(f"unknown model spec {spec_name!r}; known: {', '.join(sorted(MODEL_SPECS))}")
    torch.manual_seed(seed)
    scheduler_config = SD14_SCHEDULER_CONFIG if spec.text_2 is None else SDXL_SCHEDULER_CONFIG
    parts = dict(vae=build_vae(spec.vae), text_encoder=build_text_encoder(spec.text), tokenizer=load_clip_tokenizer(),
                 unet=build_unet(spec.unet), scheduler=DPMSolverMultistepScheduler.from_config(scheduler_config))
    if spec.text_2 is None:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=build_text_encoder_2(spec.text_2),
                                         tokenizer_2=load_clip_tokenizer(pad_token=SDXL_TOKENIZER_2_PAD))
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    # Keep the original's own scheduler file, so a random dir reads like a real one.
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    (out / "obclip_model.json").write_text(json.dumps({"spec": spec_name, "seed": seed, "weights": "random"}, indent=2))
    return out


# The embedded default pair: ObCLIP-Mini, trained on synthetic coloured shapes
# by mini/train.py and shipped inside the package (obclip/models/obclip-mini/MODEL_CARD.md).
DEFAULT_MODELS_DIR = embedded_models_dir()


def default_models(root: Path = DEFAULT_MODELS_DIR) -> tuple[Path, Path]:
    """The embedded default pair (cloud dir, device dir); a clear error if it is missing."""
    pair = (root / "cloud", root / "device")
    missing = [str(p) for p in pair if not (p / "model_index.json").is_file()]
    if missing:
        raise ArtifactError(
            f"the embedded ObCLIP-Mini model pair is missing ({', '.join(missing)}). It ships with the "
            "obclip package: reinstall obclip (from a checkout: `git checkout -- src/obclip/models/obclip-mini`), "
            "or retrain it with `python -m mini.train --out src/obclip/models/obclip-mini` (see its "
            "MODEL_CARD.md), or name a model.")
    return pair


def model_schema(model: str) -> str | None:
    """The attribute schema a model directory was trained for (``obclip_model.json``'s ``schema``:
    a schema shipped with obclip, e.g. "shapes"), or None where the model does not say."""
    info = Path(model).expanduser() / "obclip_model.json"
    if not info.is_file():
        return None
    try:
        schema = json.loads(info.read_text()).get("schema")
    except (OSError, ValueError, AttributeError):
        raise ArtifactError(f"{info} is not a JSON object; fix or delete it") from None
    if schema is not None and not isinstance(schema, str):
        raise ArtifactError(f"{info}: 'schema' must be the name of a schema, got {schema!r}")
    return schema


def resolve_model_dir(model: str | None, role: str) -> str:
    """Model argument -> a local directory or hub id. None = embedded default."""
    if model is None:
        cloud, device = default_models()
        return str(cloud if role == "cloud" else device)
    return model


def from_pretrained(cls, model: str, subfolder: str, **kwargs):
    """Load one component; a missing local directory is a clear error."""
    path = Path(model).expanduser()
    is_local = path.exists()
    looks_local = model.startswith((".", "/", "~")) or Path(model).is_absolute() or model.count("/") != 1
    if not is_local and looks_local:
        raise InputError(
            f"model directory {model!r} does not exist. Pass a diffusers-layout directory "
            "(model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/) or a hub id "
            "such as CompVis/stable-diffusion-v1-4 where the hub is reachable."
        )
    if is_local and not (path / subfolder).is_dir():
        raise InputError(
            f"model directory {model!r} has no {subfolder}/ folder; expected the diffusers layout "
            "(text_encoder/, tokenizer/, unet/, vae/, scheduler/)."
        )
    try:
        return cls.from_pretrained(str(path) if is_local else model, subfolder=subfolder,
                                   local_files_only=is_local, **kwargs)
    except OSError as e:  # hub id unreachable, or files missing
        raise InputError(f"could not load {subfolder} from {model!r}: {e}") from e


@dataclass
class TextToLatentModel:
    """What one side needs to run denoising steps in torch: tokenizer(s), text encoder(s), UNet,
    scheduler config, the latent geometry and the UNet's conditioning (its family)."""

    model_id: str
    tokenizer: CLIPTokenizerFast  # tokenizers-backed: export saves its tokenizer.json
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    scheduler_config: dict
    vae_scale_factor: int
    vae_scaling_factor: float
    conditioning: Conditioning = Conditioning()
    tokenizer_2: CLIPTokenizerFast | None = None              # SDXL family only
    text_encoder_2: CLIPTextModelWithProjection | None = None

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def default_image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        geometry = LatentGeometry(self.latent_channels, self.vae_scale_factor, default_size=self.default_image_size,
                                  source=f"the model {self.model_id}")
        return geometry.latent_shape(height, width)

    def _ids(self, tokenizer: CLIPTokenizerFast, prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=False, return_tensors="pt").input_ids
        if ids.shape[1] > tokenizer.model_max_length:
            raise PromptTooLongError(f"a prompt is {ids.shape[1]} tokens, over the text encoder's limit of "
                                     f"{tokenizer.model_max_length}; shorten it")
        return ids.to(self.unet.device)

    @torch.no_grad()
    def encode_texts(self, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The UNet's text conditioning of each prompt: hidden states [B, L, D] and the added inputs
        computed from text (SDXL: ``text_embeds`` [B, pooled], the second encoder's projected pooled
        output), as diffusers' pipelines compute them.

        SDXL family: the penultimate hidden states of both encoders, concatenated; with
        ``conditioning.zero_uncond`` the empty prompt's row is zeros (force_zeros_for_empty_prompt)."""
        if self.conditioning.text_encoders == 1:
            return self.text_encoder(self._ids(self.tokenizer, prompts))[0].to(self.unet.dtype), {}
        assert self.tokenizer_2 is not None and self.text_encoder_2 is not None
        first = self.text_encoder(self._ids(self.tokenizer, prompts), output_hidden_states=True)
        second = self.text_encoder_2(self._ids(self.tokenizer_2, prompts), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds
        if self.conditioning.zero_uncond:
            empty = torch.tensor([p == "" for p in prompts], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return hidden.to(self.unet.dtype), {TEXT_EMBEDS: pooled.to(self.unet.dtype)}

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """[B, L, D] hidden states of the prompts (``encode_texts``' first half)."""
        return self.encode_texts(prompts)[0]

    def added_inputs(self, prompts: list[str], text_added: dict[str, torch.Tensor], height: int, width: int,
                     guidance_scale: float) -> dict[str, torch.Tensor]:
        """Every added input of the UNet, one row per prompt: those from text (``encode_texts``) and
        those computed by ``runtime.conditioning`` (``time_ids``, ``timestep_cond``), as tensors."""
        rest = self.conditioning.request_added(len(prompts), height, width, guidance_scale)
        device, dtype = self.unet.device, self.unet.dtype
        return {**text_added, **{k: torch.from_numpy(v).to(device=device, dtype=dtype) for k, v in rest.items()}}


# The SDXL pipelines' tokenizer_2 pads with "!" (id 0), tokenizer with <|endoftext|>.
SDXL_TOKENIZER_2_PAD = "!"


def _zero_uncond(model: str, local: bool) -> bool:
    """diffusers' ``force_zeros_for_empty_prompt`` of an SDXL pipeline folder (its default: True)."""
    index = Path(model).expanduser() / "model_index.json"
    if not local or not index.is_file():
        return True
    try:
        return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True))
    except ValueError:
        raise ArtifactError(f"{index} is not JSON; fix or delete it") from None


def load_text_to_latent(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> TextToLatentModel:
    """Load tokenizer(s) + text encoder(s) + UNet + scheduler/VAE configs from a model directory or hub id.

    The UNet's config says its family (``Conditioning.from_unet_config``); an SDXL-family model also
    loads ``tokenizer_2/`` and ``text_encoder_2/``."""
    from diffusers import DPMSolverMultistepScheduler

    tokenizer = from_pretrained(CLIPTokenizerFast, model, "tokenizer")
    text_encoder = from_pretrained(CLIPTextModel, model, "text_encoder", torch_dtype=dtype).to(device).eval()
    unet = from_pretrained(UNet2DConditionModel, model, "unet", torch_dtype=dtype).to(device).eval()
    local = Path(model).is_dir()
    conditioning = Conditioning.from_unet_config(unet.config)
    tokenizer_2 = text_encoder_2 = None
    if conditioning.text_encoders == 2:
        conditioning = Conditioning.from_unet_config(unet.config, zero_uncond=_zero_uncond(model, local))
        tokenizer_2 = from_pretrained(CLIPTokenizerFast, model, "tokenizer_2")
        text_encoder_2 = from_pretrained(CLIPTextModelWithProjection, model, "text_encoder_2",
                                         torch_dtype=dtype).to(device).eval()
        width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
        if width != unet.config.cross_attention_dim or text_encoder_2.config.projection_dim != conditioning.pooled_dim:
            raise ArtifactError(f"{model}: the text encoders give {width}-d hidden states and "
                                f"{text_encoder_2.config.projection_dim}-d pooled embeddings, the UNet takes "
                                f"{unet.config.cross_attention_dim} and {conditioning.pooled_dim}; the folder mixes "
                                "models")
    scheduler_config = dict(DPMSolverMultistepScheduler.load_config(model, subfolder="scheduler",
                                                                    local_files_only=local))
    vae_config = AutoencoderKL.load_config(model, subfolder="vae", local_files_only=local)
    return TextToLatentModel(
        model_id=model,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        scheduler_config=scheduler_config,
        vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
        vae_scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),
        conditioning=conditioning,
        tokenizer_2=tokenizer_2,
        text_encoder_2=text_encoder_2,
    )
