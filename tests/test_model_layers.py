"""Stock layers of the model: interleaved RoPE, local masks, the entropy model's attention."""

import dataclasses
import math

import torch

from blt_ext.model import BOS_ID, EOS_ID, ByteTokenizer, EntropyModel, preset
from blt_ext.model.layers import (
    AttentionMask,
    apply_rope,
    attend,
    document_ids,
    is_plain_causal,
    rope_angles,
    self_attention_mask,
    split_document_ids,
)

TOK = ByteTokenizer()


def encode(text):
    return torch.tensor([TOK.encode(text, add_eos=False)])


# ---- layers ---------------------------------------------------------------------------------


def test_rope_rotates_adjacent_pairs():
    cos, sin = rope_angles(torch.tensor([1]), head_dim=4, theta=10000.0)  # frequencies 1 and 0.01
    x = torch.tensor([[[[1.0, 0.0, 0.0, 1.0]]]])  # [B, S, H, D]
    out = apply_rope(x, cos, sin).flatten()
    expected = torch.tensor([math.cos(1), math.sin(1), -math.sin(0.01), math.cos(0.01)])
    torch.testing.assert_close(out, expected)


def test_rope_scores_depend_on_relative_position_only():
    q, k = torch.randn(2, 1, 1, 8)
    def score(pq, pk):
        cq, sq = rope_angles(torch.tensor([pq]), 8, 500000.0)
        ck, sk = rope_angles(torch.tensor([pk]), 8, 500000.0)
        return (apply_rope(q[None], cq, sq) * apply_rope(k[None], ck, sk)).sum()
    torch.testing.assert_close(score(5, 2), score(105, 102), atol=1e-5, rtol=1e-5)


def test_local_mask_is_causal_windowed_and_split_after_eos():
    tokens = torch.tensor([[BOS_ID, 9, 9, EOS_ID, BOS_ID, 9, 9]])
    assert document_ids(tokens).tolist() == [[0, 0, 0, 0, 1, 1, 1]]
    mask = self_attention_mask(document_ids(tokens), 7, window=3).dense[0, 0].int()
    expected = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 0, 0],  # the EOS belongs to the first document; window of 3 keys
        [0, 0, 0, 0, 1, 0, 0],  # the next document starts fresh
        [0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 1],
    ]
    assert mask.tolist() == expected


def test_plain_causal_masks_are_recognised():
    one_doc = split_document_ids(torch.tensor([[BOS_ID, 9, 9, EOS_ID], [BOS_ID, 9, 9, 9]]))  # EOS last: one doc
    two_tokens = torch.tensor([[BOS_ID, 9, EOS_ID, 9], [BOS_ID, 9, 9, 9]])
    two_docs = split_document_ids(two_tokens)
    assert one_doc is None and torch.equal(two_docs, document_ids(two_tokens))
    assert is_plain_causal(one_doc, 4, window=None) and is_plain_causal(one_doc, 4, window=4)
    assert not is_plain_causal(one_doc, 4, window=3)  # the window binds
    assert not is_plain_causal(two_docs, 4, window=None)  # a row holds two documents
    assert self_attention_mask(one_doc, 4, window=512) == AttentionMask(None, None)
    assert self_attention_mask(two_docs, 4, window=512).dense is not None


def test_plain_causal_attention_equals_the_dense_causal_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 33, 8)  # [B, H, S, D]
    tokens = torch.randint(4, 260, (2, 33))
    fast = self_attention_mask(split_document_ids(tokens), 33, window=64)
    assert fast.dense is None and fast.block is None
    causal = torch.ones(33, 33, dtype=torch.bool).tril().expand(2, 1, 33, 33)
    torch.testing.assert_close(attend(q, k, v, fast), attend(q, k, v, AttentionMask(causal, None)))


def test_flex_mask_matches_dense_mask():
    torch.manual_seed(0)
    tokens = torch.randint(4, 260, (2, 40))
    tokens[0, 13] = EOS_ID
    docs = document_ids(tokens)
    dense = self_attention_mask(docs, 40, window=9, impl="sdpa").dense
    block = self_attention_mask(docs, 40, window=9, impl="flex").block
    rebuilt = torch.stack([
        torch.stack([block.mask_mod(torch.tensor(b), 0, torch.tensor(i), torch.arange(40)) for i in range(40)])
        for b in range(2)
    ])
    assert torch.equal(rebuilt, dense[:, 0])


# ---- entropy model --------------------------------------------------------------------------


def _entropy_model(window):
    torch.manual_seed(0)
    return EntropyModel(dataclasses.replace(preset("blt-entropy-tiny"), sliding_window=window)).eval()


def test_entropy_model_documents_are_independent():
    model = _entropy_model(window=None)
    first, second = TOK.encode("first doc"), TOK.encode("second one", add_eos=False)
    with torch.no_grad():
        packed = model(torch.tensor([first + second]))
        alone = model(torch.tensor([second]))
    # RoPE scores depend on relative positions only, so the shift changes nothing but rounding.
    torch.testing.assert_close(packed[0, len(first):], alone[0], atol=2e-5, rtol=1e-5)


def test_entropy_model_window_limits_the_context():
    window = 8
    model = _entropy_model(window)
    # each layer looks `window` keys back, so L layers see L * (window - 1) + 1 positions
    context = model.config.n_layers * (window - 1) + 1
    tokens = encode("a sliding window of eight bytes, stacked over two layers")
    with torch.no_grad():
        full = model(tokens)
        for i in (context, 30, tokens.shape[1] - 1):
            tail = model(tokens[:, i - context + 1 : i + 1])
            torch.testing.assert_close(full[0, i], tail[0, -1], atol=2e-5, rtol=1e-5)
        assert not torch.allclose(_entropy_model(None)(tokens), full)


