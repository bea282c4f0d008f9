"""Named configurations, loading errors and tokenizer parity between the sides."""

import pytest
import torch

from obclip.cloud.models import build_unet, load_clip_tokenizer, load_text_to_latent
from obclip.runtime.errors import InputError
from obclip.runtime.tokenizer import ClipTokenizer

# docs/method.md's parameter counts (millions), to the precision the paper gives.
PAPER_PARAMS_M = {"sd-v1.4": 859.5, "bk-sdm-small": 482.3, "bk-sdm-tiny": 323.3}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_named_unet_configs_match_the_papers_sizes(name):
    with torch.device("meta"):
        unet = build_unet(name)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    assert abs(params - PAPER_PARAMS_M[name]) < 0.1, f"{name}: {params:.2f} M"


def test_bk_sdm_small_has_no_mid_block_and_one_layer_per_block():
    with torch.device("meta"):
        unet = build_unet("bk-sdm-small")
    assert unet.mid_block is None and unet.config.layers_per_block == 1


def test_unknown_names_and_missing_directories_are_clear():
    with pytest.raises(ValueError, match="unknown UNet config 'sd-v9'"):
        build_unet("sd-v9")
    with pytest.raises(InputError, match="does not exist"):
        load_text_to_latent("/nonexistent/model/dir")


def test_directory_without_a_component_is_clear(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(InputError, match="no tokenizer/ folder"):
        load_text_to_latent(str(tmp_path))


def test_device_tokenizer_matches_the_clouds(engines_dir):
    from obclip.runtime.manifest import Manifest

    m = Manifest.load(engines_dir)
    device_tok = ClipTokenizer(engines_dir / m.tokenizer, m.text_max_length, m.pad_token_id)
    cloud_tok = load_clip_tokenizer()
    prompts = ["a photograph of an astronaut riding a horse", "A Middle-Aged  WOMAN, wearing glasses!",
               "", "héllo wörld café", "portrait of an old indian man, 4k, highly detailed"]
    want = cloud_tok(prompts, padding="max_length", max_length=77, return_tensors="np").input_ids
    assert (device_tok(prompts) == want).all()
    assert device_tok(["a photograph of an astronaut riding a horse"])[0, :10].tolist() == [
        49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
