"""The pluggable learned detector: an ONNX token classifier the test builds (onnx.helper, a
WordLevel tokenizer), plugged into TransformConfig. It can only add protection."""

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers  # noqa: E402

from obclip.device.oblivious import ObliviousError, ObliviousTransform, TransformConfig  # noqa: E402
from obclip.device.oblivious.detector import OnnxTokenClassifier, read_labels  # noqa: E402

LABELS = ["O", "B-NAME", "I-NAME", "B-AGE"]
# The tiny classifier's knowledge: a word's label, whatever its context (an embedding lookup).
TAGGED = {"rose": "B-NAME", "garden": "O", "a": "O", "red": "O", "car": "O", "woman": "O", "man": "O",
          "in": "O", "the": "O", "photo": "O", "of": "O", "sunny": "O", "smith": "I-NAME", "decade": "B-AGE"}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pii")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(TAGGED)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    table = np.full((len(vocab), len(LABELS)), -5.0, dtype=np.float32)
    table[0, 0] = 5.0  # unknown words: O
    for w, label in TAGGED.items():
        table[vocab[w], LABELS.index(label)] = 5.0
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0)], "tagger",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, len(LABELS)])],
        [helper.make_tensor("table", TensorProto.FLOAT, table.shape, table.flatten().tolist())])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "model.onnx")
    (folder / "config.json").write_text(json.dumps({"id2label": {str(i): x for i, x in enumerate(LABELS)}}))
    return folder


def test_it_labels_stretches(classifier):
    det = OnnxTokenClassifier.from_folder(classifier)
    found = det.find("a photo of Rose Smith in the garden")
    assert [(f.text, f.attribute) for f in found] == [("Rose Smith", "detector:NAME")]
    assert det.find("a red car") == []


def test_it_only_adds_protection(classifier):
    rules = ObliviousTransform()
    learned = ObliviousTransform(TransformConfig(detector=OnnxTokenClassifier.from_folder(classifier)))
    # Vouched by the rules ("rose" in lower case is a flower), labelled by the detector: kept on the device.
    assert rules("a rose garden").n == 1
    r = learned("a rose garden")
    assert r.device_only and "learned detector labels NAME" in r.reason
    # Nothing labelled: the same set as the rules alone.
    assert learned("a woman in a red car").candidates == rules("a woman in a red car").candidates
    # What the rules keep on the device stays there, whatever the detector says.
    assert learned("Maria in a red car").device_only


def test_it_reads_the_candidate_not_the_real_prompt(classifier):
    # The detector sees the first member with the rewritten words masked, so both values of
    # the slot get the same answer.
    learned = ObliviousTransform(TransformConfig(detector=OnnxTokenClassifier.from_folder(classifier)))
    assert learned("a man in the sunny decade").reason == learned("a woman in the sunny decade").reason != ""


def test_it_can_be_limited_to_some_labels(classifier):
    only_age = OnnxTokenClassifier.from_folder(classifier, only=["AGE"])
    assert only_age.find("a photo of Rose") == []
    assert [f.text for f in only_age.find("the decade")] == ["decade"]


def test_bad_files_get_clear_errors(classifier, tmp_path):
    (tmp_path / "labels.json").write_text('{"not": "labels"}')
    with pytest.raises(ObliviousError, match="list of label names"):
        read_labels(tmp_path / "labels.json")
    with pytest.raises(ObliviousError, match="does not exist"):
        OnnxTokenClassifier(tmp_path / "missing.onnx", classifier / "tokenizer.json", classifier / "config.json")
    (tmp_path / "short.json").write_text(json.dumps(LABELS[:2]))
    det = OnnxTokenClassifier(classifier / "model.onnx", classifier / "tokenizer.json", tmp_path / "short.json")
    with pytest.raises(ObliviousError, match="expected"):
        det.find("a rose")
    with pytest.raises(ObliviousError, match="find"):
        TransformConfig(detector=object())  # type: ignore[arg-type]


def test_the_candidates_cli_takes_a_detector(classifier, capsys):
    from obclip.device.oblivious import main

    assert main(["a rose garden", "--detector", str(classifier)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device_only"] and out["candidates"] == []
