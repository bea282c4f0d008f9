"""int8 device engines from the shipped ObCLIP-Mini pair hold their floor on the worst check prompt.

The export refuses an int8 folder whose worst check prompt (its median PSNR over the check seeds) is
below ``PSNR_FLOOR["int8"]``; this test builds one from the shipped device model exactly as
``build_engines.py --device-precision int8`` does, so a change to quantisation that loses the floor
fails here, not on an app developer's machine. The same check refuses the static QDQ variant, which
quantises convolution activations (the setting that read 16-17 dB): the floor can fail. What no CPU
changes is checked too: no integer product in the int8 UNet can saturate (x86 without VNNI multiplies
uint8 x int8 pairs into int16 with saturation, onnxruntime's U8S8 caveat).
"""

from __future__ import annotations

import pytest

from obclip.runtime.errors import ArtifactError

# Integer ops whose second operand is a quantised weight, and the input index of that weight.
INTEGER_OPS_WEIGHT_INPUT = {"MatMulInteger": 1, "ConvInteger": 1, "DynamicQuantizeMatMul": 1,
                            "QLinearConv": 3, "QLinearMatMul": 3}
# uint8 activations x int8 weights stay exact in int16 pairs when |weight| <= 64 (255 * 64 * 2 < 2**15).
SAFE_INT8_WEIGHT = 64


@pytest.fixture(scope="module")
def shipped_fp32(tmp_path_factory):
    from obclip.cloud.models import default_models
    from obclip.export.device_engines import build_device_engines

    out = tmp_path_factory.mktemp("shipped-int8")
    build_device_engines(str(default_models()[1]), out)
    return out


@pytest.fixture(scope="module")
def shipped_int8(shipped_fp32):
    from obclip.export.device_variants import build_device_variant

    return build_device_variant(shipped_fp32 / "device", "int8", shipped_fp32)  # raises below the floor


def test_int8_from_the_shipped_pair_holds_the_floor_on_the_worst_prompt(shipped_int8):
    from obclip.export.device_variants import PSNR_FLOOR, VariantCheck

    check = shipped_int8.variant_check
    assert check["enforced"] is True and check["passed"] is True  # trained: the floor is enforced
    assert check["prompts"] == list(VariantCheck().prompts) and check["seeds"] == list(VariantCheck().seeds)
    assert len(check["image_psnr_median_db"]) == len(check["prompts"])
    assert check["image_psnr_min_db"] >= PSNR_FLOOR["int8"], check


def test_the_floor_refuses_int8_that_quantises_conv_activations(shipped_fp32):
    from obclip.export.device_variants import build_device_variant

    with pytest.raises(ArtifactError, match="int8-qdq device engines reach only .* worst check prompt"):
        build_device_variant(shipped_fp32 / "device", "int8-qdq", shipped_fp32)
    assert not (shipped_fp32 / "device-int8-qdq").exists()


def test_no_integer_product_in_the_int8_unet_can_saturate(shipped_int8):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(shipped_int8.path_of("unet"))).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    checked = 0
    for node in graph.node:
        if node.op_type not in INTEGER_OPS_WEIGHT_INPUT:
            continue
        w = weights[node.input[INTEGER_OPS_WEIGHT_INPUT[node.op_type]]]
        if w.dtype == np.int8:
            assert int(np.abs(w.astype(np.int16)).max()) <= SAFE_INT8_WEIGHT, node.name
        else:
            assert w.dtype == np.uint8, (node.name, w.dtype)
        checked += 1
    assert checked > 0  # the UNet is quantised at all
