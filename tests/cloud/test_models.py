"""Named configurations, loading errors and tokenizer parity between the sides."""

import pytest
import torch

from obclip.cloud.models import build_unet, load_clip_tokenizer, load_text_to_latent
from obclip.runtime.errors import InputError
from obclip.runtime.tokenizer import ClipTokenizer

# docs/method.md's parameter counts (millions), to the precision the paper gives; SDXL's and KOALA's
# from the KOALA paper's Table (arXiv 2312.04005: 2,567M, 1,161M, 782M; docs/models.md).
PAPER_PARAMS_M = {"sd-v1.4": 859.5, "bk-sdm-small": 482.3, "bk-sdm-tiny": 323.3}
KOALA_PAPER_PARAMS_M = {"sdxl": 2567, "koala-1b": 1161, "koala-700m": 782}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_named_unet_configs_match_the_papers_sizes(name):
    with torch.device("meta"):
        unet = build_unet(name)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    assert abs(params - PAPER_PARAMS_M[name]) < 0.1, f"{name}: {params:.2f} M"


@pytest.mark.parametrize("name", sorted(KOALA_PAPER_PARAMS_M))
def test_sdxl_family_configs_match_the_published_sizes(name):
    with torch.device("meta"):
        unet = build_unet(name)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    assert int(params) == KOALA_PAPER_PARAMS_M[name], f"{name}: {params:.2f} M"   # the paper truncates


def test_sdxl_family_topology():
    """SDXL: no attention in the first stage, transformer depth 2 and 10; KOALA: the deepest stage cut,
    one layer per encoder stage, 700m without a mid block; LCM-SDXL: SDXL plus the guidance embedding."""
    with torch.device("meta"):
        sdxl, k700, k1b, lcm = (build_unet(n) for n in ("sdxl", "koala-700m", "koala-1b", "lcm-sdxl"))
    depth = [[len(a.transformer_blocks) for a in getattr(b, "attentions", [])] for b in sdxl.down_blocks]
    assert depth == [[], [2, 2], [10, 10]] and len(sdxl.mid_block.attentions[0].transformer_blocks) == 10
    assert [[len(a.transformer_blocks) for a in getattr(b, "attentions", [])] for b in k700.down_blocks] == [
        [], [2], [5]]
    assert k700.mid_block is None and k1b.mid_block is not None
    assert [len(b.resnets) for b in k1b.up_blocks] == [2, 2, 2]
    assert lcm.config.time_cond_proj_dim == 256 and sdxl.config.time_cond_proj_dim is None
    extra = sum(p.numel() for p in lcm.parameters()) - sum(p.numel() for p in sdxl.parameters())
    assert extra == 256 * 320   # the guidance embedding's projection into the time embedding


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
