"""The exported device graphs as components with diffusers' signatures (optimum's ``ORTUnet`` way).

    graphs = DeviceGraphs("engines/device")              # one engines folder, one SessionConfig
    text = graphs.text_encoder.encode(["", prompt])      # [2, L, D]
    eps = graphs.unet(sample, timestep, text)            # UNet2DConditionModel's arguments
    images = graphs.vae_decoder(latents)                 # uint8 [B, H, W, 3]

Each component reads its input and output names from the manifest (the component's ``inputs`` and
``outputs``), checks the sizes it is fed against the manifest, and runs through a session opened by
``runtime.sessions.open_session``. The denoising loop that uses them is ``runtime.denoise``; the
device pipeline and export's variant checks both run it on these components.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from .conditioning import TEXT_EMBEDS, Conditioning
from .errors import ArtifactError, InputError
from .manifest import Component, Manifest, ManifestMismatchError
from .sessions import SessionConfig, open_session, ort, resolve_providers
from .tokenizer import ClipTokenizer

# optimum's ONNX names for the roles every UNet graph has; further inputs (e.g. added conditioning)
# are fed by the names the manifest lists.
UNET_SAMPLE, UNET_TIMESTEP, UNET_TEXT = "sample", "timestep", "encoder_hidden_states"
# The device's decoder choices -> their manifest components: the model's VAE decoder, or a tiny
# decoder (diffusers' AutoencoderTiny, TAESD) exported beside it (export/tiny_decoder.py). The tiny
# graph takes the denoiser's latents unscaled: its scaling_factor is divided inside the graph.
DECODERS = {"full": "vae_decoder", "tiny": "vae_decoder_tiny"}


def check_decoder(decoder: str) -> None:
    if decoder not in DECODERS:
        raise InputError(f"decoder {decoder!r}: choose one of {list(DECODERS)}")


def _names_match(component: Component, session: ort.InferenceSession, what: str) -> None:
    graph = tuple(i.name for i in session.get_inputs())
    if set(graph) != set(component.inputs):
        raise ArtifactError(f"the {what} graph takes inputs {list(graph)}, its manifest lists "
                            f"{list(component.inputs)}; rerun export: python export/build_engines.py")


def _check_shape(what: str, array: np.ndarray, want: Sequence[int | None]) -> None:
    """``want``: the expected sizes, None where any size goes."""
    if array.ndim != len(want) or any(w is not None and a != w for a, w in zip(array.shape, want)):
        shown = ["*" if w is None else w for w in want]
        raise InputError(f"{what} has shape {list(array.shape)}, expected {shown}")


class TextEncoder:
    """An exported text encoder: token ids -> its outputs by name (``last_hidden_state`` first)."""

    def __init__(self, session: ort.InferenceSession, component: Component, tokenizer: ClipTokenizer,
                 run_options: ort.RunOptions | None = None):
        _names_match(component, session, "text encoder")
        if component.inputs != ("input_ids",) or "last_hidden_state" not in component.outputs:
            raise ArtifactError(f"a text encoder graph takes input_ids and returns last_hidden_state; this one has "
                                f"{list(component.inputs)} -> {list(component.outputs)}; rerun export")
        self.session, self.component, self.tokenizer = session, component, tokenizer
        self.run_options = run_options   # what every run passes (SessionConfig.run_options: arena shrinkage)
        # int32 (optimum's, what diffusers' ONNX pipeline feeds) in current exports, int64 in older ones
        self.ids_dtype = np.int64 if session.get_inputs()[0].type == "tensor(int64)" else np.int32

    def __call__(self, input_ids: np.ndarray, outputs: Sequence[str] = ("last_hidden_state",)) -> dict[str, np.ndarray]:
        _check_shape("input_ids", input_ids, (None, self.tokenizer.max_length))
        unknown = [o for o in outputs if o not in self.component.outputs]
        if unknown:
            raise InputError(f"the text encoder has no outputs {unknown}; it has {list(self.component.outputs)}")
        values = self.session.run(list(outputs), {"input_ids": input_ids.astype(self.ids_dtype, copy=False)},
                                  self.run_options)
        return dict(zip(outputs, values))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[B, L, D] hidden states of the texts (each must fit the context), the UNet's conditioning."""
        return self(self.tokenizer(texts))["last_hidden_state"]


PENULTIMATE = "penultimate_hidden_state"   # an SDXL-family text graph's second-to-last layer output


class TextConditioning:
    """The UNet's conditioning from text, from the exported text encoder(s), as diffusers' pipelines
    compute it: hidden states [B, L, D] and the added inputs that come from text.

    SD: the encoder's last hidden state, no added inputs. SDXL family (``Conditioning.text_encoders``
    == 2): both encoders' penultimate hidden states concatenated and ``text_encoder_2``'s projected
    pooled output as ``text_embeds``; with ``zero_uncond`` the empty prompt's rows are zeros
    (``force_zeros_for_empty_prompt``). The device and the onnxruntime cloud both use this."""

    def __init__(self, conditioning: Conditioning, encoders: Sequence[TextEncoder]):
        if len(encoders) != conditioning.text_encoders:
            raise ArtifactError(f"a {conditioning.family}-family UNet takes {conditioning.text_encoders} text "
                                f"encoder(s), got {len(encoders)}; rerun export")
        if conditioning.text_encoders == 2:
            for encoder in encoders:
                if PENULTIMATE not in encoder.component.outputs:
                    raise ArtifactError(f"an SDXL-family text graph returns {PENULTIMATE}; this one has "
                                        f"{list(encoder.component.outputs)}; rerun export")
            if TEXT_EMBEDS not in encoders[1].component.outputs:
                raise ArtifactError(f"text_encoder_2 returns {TEXT_EMBEDS}; this one has "
                                    f"{list(encoders[1].component.outputs)}; rerun export")
        self.conditioning, self.encoders = conditioning, tuple(encoders)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if self.conditioning.text_encoders == 1:
            return self.encoders[0].encode(texts), {}
        first, second = self.encoders
        a = first(first.tokenizer(texts), (PENULTIMATE,))[PENULTIMATE]
        b = second(second.tokenizer(texts), (PENULTIMATE, TEXT_EMBEDS))
        hidden, pooled = np.concatenate([a, b[PENULTIMATE]], axis=-1), b[TEXT_EMBEDS]
        if self.conditioning.zero_uncond:
            empty = np.array([t == "" for t in texts])
            hidden = np.where(empty[:, None, None], np.float32(0), hidden)
            pooled = np.where(empty[:, None], np.float32(0), pooled)
        return hidden, {TEXT_EMBEDS: pooled}


def open_text_conditioning(manifest: Manifest, config: SessionConfig,
                           tokenizer: ClipTokenizer | None = None) -> TextConditioning:
    """The text encoder graph(s) of an engines folder (``tokenizer``: the first one's, if already opened)."""
    m = manifest
    tokenizer = tokenizer or ClipTokenizer(m.root / m.tokenizer, m.text_max_length, m.pad_token_id)
    run_options = config.run_options()
    encoders = [TextEncoder(open_session(m.path_of("text_encoder"), config), m.components["text_encoder"], tokenizer,
                            run_options)]
    if m.tokenizer_2 is not None and m.pad_token_id_2 is not None:
        tokenizer_2 = ClipTokenizer(m.root / m.tokenizer_2, m.text_max_length, m.pad_token_id_2)
        encoders.append(TextEncoder(open_session(m.path_of("text_encoder_2"), config),
                                    m.components["text_encoder_2"], tokenizer_2, run_options))
    return TextConditioning(m.unet_conditioning(), encoders)


class UNet:
    """An exported UNet, called as diffusers' ``UNet2DConditionModel``: (sample, timestep,
    encoder_hidden_states, **added inputs) -> the noise prediction. The graph's inputs are those its
    manifest lists; every one must be given."""

    def __init__(self, session: ort.InferenceSession, component: Component, latent_channels: int, text_length: int,
                 run_options: ort.RunOptions | None = None):
        _names_match(component, session, "UNet")
        missing = {UNET_SAMPLE, UNET_TIMESTEP, UNET_TEXT} - set(component.inputs)
        if missing or len(component.outputs) != 1:
            raise ArtifactError(f"a UNet graph takes {UNET_SAMPLE}, {UNET_TIMESTEP}, {UNET_TEXT} and returns one "
                                f"tensor; this one has {list(component.inputs)} -> {list(component.outputs)}; "
                                "rerun export")
        self.session, self.component = session, component
        self.latent_channels, self.text_length = latent_channels, text_length
        self.run_options = run_options   # what every run passes (SessionConfig.run_options: arena shrinkage)

    def feeds(self, sample: np.ndarray, timestep: float | np.ndarray, encoder_hidden_states: np.ndarray,
              **added: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's inputs by name, checked: ``timestep`` a scalar or one per row."""
        b = sample.shape[0]
        _check_shape("sample", sample, (None, self.latent_channels, None, None))
        _check_shape("encoder_hidden_states", encoder_hidden_states, (b, self.text_length, None))
        feeds = {UNET_SAMPLE: sample.astype(np.float32, copy=False),
                 UNET_TIMESTEP: np.broadcast_to(np.asarray(timestep, np.float32), (b,)).copy(),
                 UNET_TEXT: encoder_hidden_states.astype(np.float32, copy=False), **added}
        if set(feeds) != set(self.component.inputs):
            raise InputError(f"this UNet graph takes {sorted(self.component.inputs)}, got {sorted(feeds)}")
        return feeds

    def run(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        out: np.ndarray = self.session.run([self.component.outputs[0]], dict(feeds), self.run_options)[0]
        return out

    def __call__(self, sample: np.ndarray, timestep: float | np.ndarray, encoder_hidden_states: np.ndarray,
                 **added: np.ndarray) -> np.ndarray:
        return self.run(self.feeds(sample, timestep, encoder_hidden_states, **added))


def to_uint8_images(decoded: np.ndarray) -> np.ndarray:
    """A VAE decoder's output [B, 3, H, W] in [-1, 1] -> uint8 images [B, H, W, 3]."""
    image = np.clip(decoded / 2 + 0.5, 0.0, 1.0)
    return np.asarray((image.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8))


class VaeDecoder:
    """An exported VAE decoder: latents [B, C, h, w] (as the denoiser leaves them) -> uint8 images."""

    def __init__(self, session: ort.InferenceSession, component: Component, latent_channels: int,
                 scaling_factor: float, run_options: ort.RunOptions | None = None):
        _names_match(component, session, "VAE decoder")
        if len(component.inputs) != 1 or len(component.outputs) != 1:
            raise ArtifactError(f"a VAE decoder graph takes and returns one tensor; this one has "
                                f"{list(component.inputs)} -> {list(component.outputs)}; rerun export")
        self.session, self.component = session, component
        self.latent_channels, self.scaling_factor = latent_channels, scaling_factor
        self.run_options = run_options   # what every run passes (SessionConfig.run_options: arena shrinkage)

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        _check_shape("latents", latents, (None, self.latent_channels, None, None))
        scaled = (latents / self.scaling_factor).astype(np.float32)
        decoded = self.session.run([self.component.outputs[0]], {self.component.inputs[0]: scaled},
                                   self.run_options)[0]
        return to_uint8_images(decoded)


def open_decoder(manifest: Manifest, config: SessionConfig, decoder: str = "full") -> VaeDecoder:
    """The decoder graph of an engines folder: ``full`` (the VAE's, fed latents / its scaling factor)
    or ``tiny`` (fed the latents as they are), or an ArtifactError naming the export that adds it."""
    name = DECODERS[decoder]
    if name not in manifest.components:
        raise ArtifactError(f"the engines at {manifest.root} have no tiny decoder ({name}); export one with "
                            "python export/build_engines.py --tiny-decoder DIR (a local diffusers AutoencoderTiny "
                            "folder; the embedded pair ships its own), or use --decoder full")
    scaling = manifest.vae_scaling_factor if decoder == "full" else 1.0
    return VaeDecoder(open_session(manifest.path_of(name), config), manifest.components[name],
                      manifest.latent_channels, scaling, config.run_options())


def fixed_latent_size(*sessions: ort.InferenceSession) -> tuple[int, int] | None:
    """The latent (h, w) of graphs exported for one size (their first input's last two dims are
    numbers), or None for dynamic graphs."""
    for session in sessions:
        dims = session.get_inputs()[0].shape[2:]
        if len(dims) == 2 and all(isinstance(d, int) for d in dims):
            return (int(dims[0]), int(dims[1]))
    return None


class DeviceGraphs:
    """A device engines folder, opened: tokenizer, text encoder, UNet, VAE decoder and the sizes they run."""

    def __init__(self, folder: str | Path, session: SessionConfig | None = None, allow_below_floor: bool = False,
                 decoder: str = "full"):
        session = SessionConfig() if session is None else session
        check_decoder(decoder)
        self.manifest = m = Manifest.load(folder)
        if m.side != "device":
            raise ManifestMismatchError(f"{folder} holds {m.side} engines; the device needs a device engines folder "
                                        "(OUT/device from python export/build_engines.py)")
        if m.variant_check.get("passed") is False and not allow_below_floor:
            raise ArtifactError(f"{folder} holds {m.precision} engines that failed their export check (worst prompt "
                                f"{m.variant_check.get('image_psnr_min_db')} dB against fp32, floor "
                                f"{m.variant_check.get('psnr_floor_db')} dB); ship another variant, or pass "
                                "allow_below_floor=True to run it anyway")
        self.providers = resolve_providers(session.providers)
        config = replace(session, providers=self.providers)
        self.session_config = config
        self.tokenizer = ClipTokenizer(m.root / m.tokenizer, m.text_max_length, m.pad_token_id)
        self.conditioning = m.unet_conditioning()
        if not self.conditioning.guided:
            raise ArtifactError(f"{folder} holds a guidance-embedding UNet (LCM-SDXL); the device runs classifier-free "
                                "guided UNets only (e.g. Koala-700m, also with the LCM solver)")
        self.text = open_text_conditioning(m, config, self.tokenizer)
        self.text_encoder = self.text.encoders[0]
        self.unet = UNet(open_session(m.path_of("unet"), config), m.components["unet"], m.latent_channels,
                         m.text_max_length, config.run_options())
        self.decoder = decoder
        self.vae_decoder = open_decoder(m, config, decoder)
        fixed = fixed_latent_size(self.unet.session, self.vae_decoder.session)
        self.geometry = m.geometry(fixed=fixed, source=f"these device engines ({folder})")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The latent shape for an image size, or an InputError naming the sizes these engines run."""
        return self.geometry.latent_shape(height, width)

    def encode_text(self, prompts: Sequence[str]) -> np.ndarray:
        """[B, L, D] hidden states, the UNet's conditioning."""
        return self.text(prompts)[0]

    def condition(self, prompts: Sequence[str], height: int, width: int,
                  guidance_scale: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The UNet's whole conditioning, one row per prompt: hidden states [B, L, D] and its added inputs
        (SDXL family: ``text_embeds``, and ``time_ids`` of the image size, ``runtime.conditioning``)."""
        hidden, added = self.text(prompts)
        return hidden, {**added, **self.conditioning.request_added(len(prompts), height, width, guidance_scale)}

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents [B, C, h, w] -> uint8 images [B, H, W, 3]."""
        return self.vae_decoder(latents)
