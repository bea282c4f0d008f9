"""Model configurations and loading (torch side).

A *model directory* is a diffusers pipeline layout (``model_index.json``,
``text_encoder/``, ``tokenizer/``, ``unet/``, ``vae/``, ``scheduler/``), the
layout of CompVis/stable-diffusion-v1-4 and nota-ai/bk-sdm-small alike. The
cloud reads text encoder + UNet + scheduler config (+ the VAE config, for the
latent shape); the export reads the device's text encoder, UNet and VAE.

Named UNet configurations reproduce SD-v1.4 and BK-SDM-Small/Tiny exactly
(docs/method.md's parameter counts are checked in tests) and give small
SD-structured models for tests and the embedded default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast
from transformers.utils import logging as transformers_logging

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
}

VAE_CONFIGS: dict[str, dict] = {
    "sd": dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
        sample_size=512, scaling_factor=0.18215,
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
    """A full model directory described by the names of its parts."""

    unet: str
    text: str
    vae: str


MODEL_SPECS: dict[str, ModelSpec] = {
    "sd-v1.4": ModelSpec("sd-v1.4", "clip-vit-l-14", "sd"),
    "bk-sdm-small": ModelSpec("bk-sdm-small", "clip-vit-l-14", "sd"),
    "bk-sdm-tiny": ModelSpec("bk-sdm-tiny", "clip-vit-l-14", "sd"),
    "sd-v1.4-narrow": ModelSpec("sd-v1.4-narrow", "clip-l-2", "sd"),
    "mini": ModelSpec("mini", "mini", "mini"),
    "mini-small": ModelSpec("mini-small", "mini", "mini"),
}


def _named(table: dict[str, dict], kind: str, name: str) -> dict:
    if name not in table:
        raise InputError(f"unknown {kind} config {name!r}; known: {', '.join(sorted(table))}")
    return dict(table[name])


def build_unet(name: str) -> UNet2DConditionModel:
    return UNet2DConditionModel(**_named(UNET_CONFIGS, "UNet", name))


def build_text_encoder(name: str) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**_named(TEXT_CONFIGS, "text encoder", name)))


def build_vae(name: str) -> AutoencoderKL:
    return AutoencoderKL(**_named(VAE_CONFIGS, "VAE", name))


def load_clip_tokenizer() -> CLIPTokenizerFast:
    """The real CLIP BPE tokenizer from the shipped vocabulary.

    The files go positionally: with transformers 5, CLIPTokenizer(vocab_file=..,
    merges_file=..) silently builds an empty tokenizer. Padding with
    <|endoftext|> is what SD-v1.4's tokenizer does.
    """
    tok = CLIPTokenizerFast(
        str(CLIP_BPE_DIR / "vocab.json"), str(CLIP_BPE_DIR / "merges.txt"),
        pad_token="<|endoftext|>", model_max_length=77,
    )
    if len(tok) != 49408:
        raise ArtifactError(f"CLIP tokenizer from {CLIP_BPE_DIR} has {len(tok)} tokens, expected 49408")
    return tok


def write_random_model(spec_name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a diffusers-layout model directory with random weights.

    Deterministic in ``seed``. Used by the tests (fast, and the same code
    paths as trained weights; its images are noise).
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    spec = MODEL_SPECS[spec_name] if spec_name in MODEL_SPECS else None
    if spec is None:
        raise InputError(f"unknown model spec {spec_name!r}; known: {', '.join(sorted(MODEL_SPECS))}")
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=build_vae(spec.vae),
        text_encoder=build_text_encoder(spec.text),
        tokenizer=load_clip_tokenizer(),
        unet=build_unet(spec.unet),
        scheduler=DPMSolverMultistepScheduler.from_config(SD14_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    # Keep SD-v1.4's own scheduler file, so a random dir reads like a real one.
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD14_SCHEDULER_CONFIG, indent=2))
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
    """What one side needs to run denoising steps in torch: tokenizer, text
    encoder, UNet, scheduler config and the latent geometry."""

    model_id: str
    tokenizer: CLIPTokenizerFast  # tokenizers-backed: export saves its tokenizer.json
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    scheduler_config: dict
    vae_scale_factor: int
    vae_scaling_factor: float

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

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=False, return_tensors="pt").input_ids
        if ids.shape[1] > self.tokenizer.model_max_length:
            raise PromptTooLongError(f"a prompt is {ids.shape[1]} tokens, over the text encoder's limit of "
                                     f"{self.tokenizer.model_max_length}; shorten it")
        device = self.unet.device
        return self.text_encoder(ids.to(device))[0].to(self.unet.dtype)


def load_text_to_latent(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> TextToLatentModel:
    """Load tokenizer + text encoder + UNet + scheduler/VAE configs from a model directory or hub id."""
    from diffusers import DPMSolverMultistepScheduler

    tokenizer = from_pretrained(CLIPTokenizerFast, model, "tokenizer")
    text_encoder = from_pretrained(CLIPTextModel, model, "text_encoder", torch_dtype=dtype).to(device).eval()
    unet = from_pretrained(UNet2DConditionModel, model, "unet", torch_dtype=dtype).to(device).eval()
    local = Path(model).is_dir()
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
    )
