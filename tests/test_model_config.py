"""Byte tokenizer and model configuration: ids, padding, presets, sizes, validation."""

import dataclasses

import pytest
import torch

from blt_ext.model import UNVERIFIED, BLTConfig, ByteLatentTransformer, ByteTokenizer, EntropyModelConfig, ffn_hidden_dim, preset

TOK = ByteTokenizer()


def tiny(**overrides):
    return dataclasses.replace(preset("blt-tiny"), **overrides)


# ---- tokenizer ------------------------------------------------------------------------------


def test_tokenizer_roundtrip_and_specials():
    assert TOK.encode("Hi") == [1, 72 + 4, 105 + 4, 2]
    assert TOK.encode("é", add_bos=False, add_eos=False) == [0xC3 + 4, 0xA9 + 4]
    assert TOK.encode(b"\x00\xff", add_eos=False) == [1, 4, 259]
    assert TOK.decode([1, 76, 109, 2, 76]) == "HiH"
    assert TOK.decode([1, 76, 109, 2, 76], cut_at_eos=True) == "Hi"
    assert TOK.decode([0xC3 + 4]) == ""  # a lone UTF-8 lead byte is dropped
    assert TOK.decode(TOK.encode("naïve ☃")) == "naïve ☃"
    with pytest.raises(ValueError, match="outside"):
        TOK.decode([260])
    with pytest.raises(TypeError, match="str or bytes"):
        TOK.encode(3)


def test_tokenizer_batch_encode_pads_right_with_boe():
    batch = TOK.batch_encode(["ab", "", [1, 9]], add_eos=False)
    assert batch.ids.tolist() == [[1, 101, 102], [1, 0, 0], [1, 9, 0]]
    assert batch.mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert batch.lengths.tolist() == [3, 1, 2]


# ---- config ---------------------------------------------------------------------------------


def test_ffn_hidden_dims_of_the_released_models():
    assert ffn_hidden_dim(1024) == 2816 and ffn_hidden_dim(2048) == 5632 and ffn_hidden_dim(768) == 2048


def test_presets_and_their_sizes():
    one_b = preset("blt-1b")
    assert (one_b.dim_global, one_b.n_layers_global, one_b.n_layers_local_decoder, one_b.cross_attn_k) == (2048, 25, 9, 2)
    assert one_b.global_input_dim == one_b.dim_global  # no input projection for 1B
    assert preset("blt-7b").global_input_dim == 5120 != preset("blt-7b").dim_global
    assert set(UNVERIFIED["blt-7b"]) <= {f.name for f in dataclasses.fields(BLTConfig)}
    with torch.device("meta"):
        model = ByteLatentTransformer(preset("blt-1b"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    hash_params = model.local_encoder.embedding.hash_weight.numel()
    # BLT_SPEC.md h: 3.07 B hash parameters, encoder ~19 M besides them, global 1.285 B, decoder 158 M,
    # entropy model ~99.5 M.
    assert hash_params == 6 * 500002 * 1024
    assert count(model.local_encoder) - hash_params == pytest.approx(19e6, rel=0.05)
    assert count(model.global_transformer) == pytest.approx(1.285e9, rel=0.01)
    assert count(model.local_decoder) + count(model.lm_head) == pytest.approx(158e6, rel=0.02)
    assert count(model.entropy_model) == pytest.approx(99.5e6, rel=0.01)
    for name in ("blt-small", "blt-tiny"):
        assert isinstance(preset(name), BLTConfig)
    assert isinstance(preset("blt-entropy"), EntropyModelConfig)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("blt-3b")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dim_local_decoder": 64}, "must equal dim_local_decoder"),
        ({"n_heads_global": 5}, "divisible by n_heads"),
        ({"patching_mode": "bpe"}, "patching_mode must be one of"),
        ({"pooling": "sum"}, "pooling must be one of"),
        ({"cross_attn_k": 0}, "cross_attn_k must be >= 1"),
        ({"n_layers_local_encoder": 0}, "at least one layer"),
        ({"encoder_hash_byte_group_size": ()}, "n-gram sizes"),
        ({"local_attention_window_len": 0}, "local_attention_window_len"),
    ],
)
def test_config_rejects_what_the_model_cannot_run(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_config_dict_roundtrip():
    cfg = tiny(max_patch_length=7)
    assert BLTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        BLTConfig.from_dict({**cfg.to_dict(), "dim": 3})


