"""Batch reuse's token alignment (cloud/modes.align_tokens): candidates read the pivot's
cross-attention map word by word, and a candidate word reads the whole of the pivot word it
replaces, whatever either side's token count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from obclip.cloud.models import load_clip_tokenizer
from obclip.cloud.modes import align_tokens, text_tokens
from obclip.cloud.step_modes import AlignmentTensors, _aligned_cross
from obclip.device.oblivious import ObliviousTransform, TransformConfig

L = 77


@pytest.fixture(scope="module")
def tok():
    return load_clip_tokenizer()


def token_alignment(tok, candidates: list[str]):
    """Every candidate's tokens aligned to candidate 0's, as the step loop aligns them."""
    return align_tokens(text_tokens(tok.backend_tokenizer, candidates, tok.model_max_length, tok.pad_token_id))


def tokens(tok, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok(text, padding="max_length", max_length=L).input_ids)


def read(tok, candidates: list[str], i: int) -> list[tuple[str, list[str], float]]:
    """(candidate token, the pivot tokens it reads, its weight) for candidate i's tokens and EOS."""
    al = token_alignment(tok, candidates)
    pivot, cand = tokens(tok, candidates[0]), tokens(tok, candidates[i])
    n = len(tok(candidates[i]).input_ids)
    return [(cand[j], pivot[al.starts[i][j]:al.stops[i][j]], al.weights[i][j]) for j in range(n)]


def test_a_one_token_value_reads_every_token_of_a_multi_token_pivot_value(tok):
    # "caucasian" is 3 tokens, "black" 1: the candidate's word must carry the pivot word's whole weight.
    rows = read(tok, ["a photo of a Caucasian boy", "a photo of a Black boy"], 1)
    assert ("black</w>", ["cau", "ca", "sian</w>"], 1.0) in rows
    assert ("boy</w>", ["boy</w>"], 1.0) in rows


def test_a_multi_token_value_splits_a_one_token_pivot_value(tok):
    rows = read(tok, ["a photo of a Black boy", "a photo of a Caucasian boy"], 1)
    assert [r for r in rows if r[1] == ["black</w>"]] == [
        ("cau", ["black</w>"], pytest.approx(1 / 3)), ("ca", ["black</w>"], pytest.approx(1 / 3)),
        ("sian</w>", ["black</w>"], pytest.approx(1 / 3))]
    assert ("boy</w>", ["boy</w>"], 1.0) in rows and ("<|endoftext|>", ["<|endoftext|>"], 1.0) in rows


def test_a_multi_word_span_pairs_words_not_token_positions(tok):
    # "young man" vs "middle-aged woman": "woman" reads "man", and all of "middle-aged" reads "young".
    rows = read(tok, ["a photo of a young man, smiling", "a photo of a middle-aged woman, smiling"], 1)
    assert ("woman</w>", ["man</w>"], 1.0) in rows
    for word in ("middle</w>", "-</w>", "aged</w>"):
        assert (word, ["young</w>"], pytest.approx(1 / 3)) in rows
    assert (",</w>", [",</w>"], 1.0) in rows and ("smiling</w>", ["smiling</w>"], 1.0) in rows
    # and the reverse: one word reads the three-token pivot word
    rows = read(tok, ["a photo of a middle-aged woman", "a photo of a young man"], 1)
    assert ("young</w>", ["middle</w>", "-</w>", "aged</w>"], 1.0) in rows


def test_same_length_candidates_are_identity_and_padding_lines_up(tok):
    al = token_alignment(tok, ["a photo of an old man", "a photo of a young man", "a photo of a Black boy"])
    assert al.identity == (True, True, True)
    al = token_alignment(tok, ["a Black boy", "a Caucasian boy"])
    assert al.identity == (True, False)
    # after the words: EOS reads EOS, padding reads padding, one to one
    n, shift = len(tok("a Caucasian boy").input_ids), 2   # "caucasian" is two tokens longer than "black"
    assert [(al.starts[1][j], al.stops[1][j]) for j in range(n - 1, L)] == [(j - shift, j - shift + 1)
                                                                           for j in range(n - 1, L)]


def test_person_schema_candidates_read_their_own_word_slot(tok):
    """Every candidate of real prompts, at N up to 64: a token of the w-th whitespace word reads only
    the pivot's w-th word when both have as many words, and every pivot word is read by someone."""
    transform = ObliviousTransform(TransformConfig(max_candidates=64))
    backend = tok.backend_tokenizer
    prompts = ["a photo of a young Caucasian man reading", "portrait of an old Native Hawaiian woman, smiling",
               "a middle-aged Black girl and her dog"]
    checked = 0
    for prompt in prompts:
        try:
            cands = list(transform(prompt).candidates)
        except ValueError:
            continue
        texts = text_tokens(backend, cands, L, tok.pad_token_id)
        al = align_tokens(texts)
        p_words = _whitespace_words(texts[0])
        for i, t in enumerate(texts):
            c_words = _whitespace_words(t)
            if len(c_words) != len(p_words):
                continue
            checked += 1
            read_cols = set()
            for (c0, c1), (p0, p1) in zip(c_words, p_words):
                for j in range(c0, c1):
                    assert p0 <= al.starts[i][j] < al.stops[i][j] <= p1, (prompt, cands[i], j)
                    read_cols.update(range(al.starts[i][j], al.stops[i][j]))
            assert all(set(range(p0, p1)) <= read_cols for p0, p1 in p_words), cands[i]
    assert checked >= 30


def _whitespace_words(t) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    prev_end = None
    for j, (w, (a, b)) in enumerate(zip(t.words, t.spans)):
        if w is None:
            prev_end = None
            continue
        if prev_end is not None and a == prev_end:
            out[-1] = (out[-1][0], j + 1)
        else:
            out.append((j, j + 1))
        prev_end = b
    return out


def test_the_aligned_map_sums_the_pivot_word_columns():
    """The attention a candidate computes equals an explicit numpy reading of the pivot's map."""
    g = torch.Generator().manual_seed(0)
    h, lq, d = 2, 5, 4
    q, k = torch.randn(h, lq, d, generator=g), torch.randn(h, L, d, generator=g)
    v = torch.randn(3, h, L, d, generator=g)
    starts = torch.arange(L).repeat(3, 1)
    stops = starts + 1
    weights = torch.ones(3, L)
    stops[1, 4] = 7                      # candidate 1: token 4 reads pivot columns 4, 5, 6
    starts[1, 5:] = torch.arange(7, L + 2).clamp(max=L - 1)
    stops[1, 5:] = starts[1, 5:] + 1
    weights[1, -2:] = 0.5
    starts[2, 5:8] = 5                   # candidate 2: tokens 5-7 share pivot column 5
    stops[2, 5:8] = 6
    weights[2, 5:8] = 1 / 3
    starts[2, 8:], stops[2, 8:] = starts[2, 6:-2].clone(), stops[2, 6:-2].clone()
    out = _aligned_cross(q, k, v, 0.5, AlignmentTensors(starts, stops, weights))

    pivot = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1).double().numpy()
    for i in range(3):
        m = np.stack([pivot[..., starts[i, j]:stops[i, j]].sum(-1) * float(weights[i, j]) for j in range(L)], -1)
        m /= m.sum(-1, keepdims=True)
        ref = m @ v[i].double().numpy()
        assert np.abs(out[i].double().numpy() - ref).max() < 1e-5
    # the identity row is the plain attention
    plain = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v[0]
    assert torch.allclose(out[0], plain, atol=1e-6)
