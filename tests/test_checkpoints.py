"""Checkpoints: the transformers format (load, save) and the original format (load), with reports."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BltConfig, BltForCausalLM

from blt_ext.model import ByteLatentTransformer, ByteTokenizer, preset
from blt_ext.model.checkpoint import (
    CheckpointError,
    config_from_original,
    config_to_transformers,
    load_original,
    load_pretrained,
    load_transformers,
)
from blt_ext.testing.model import hf_tiny_model

TOK = ByteTokenizer()
TEXT = "Checkpoints carry the entropy model too."


def ids(text=TEXT):
    return torch.tensor([TOK.encode(text, add_eos=False)])


def hf_name(ours: str) -> str:
    """Our parameter name -> transformers name, from the key list of BLT_SPEC.md k."""
    special = {
        "local_encoder.embedding.byte_weight": "model.local_encoder.embed_tokens.weight",
        "local_encoder.embedding.hash_weight": "model.encoder_hash_tok_embedding.weight",
        "lm_head.weight": "lm_head.weight",
    }
    if ours in special:
        return special[ours]
    return "model." + ours.replace("patcher.entropy_model.", "patcher.")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf_tiny_model().save_pretrained(path)
    return path


# ---- transformers format --------------------------------------------------------------------


def test_load_transformers_checkpoint_places_every_tensor(hf_dir):
    model, report = load_transformers(hf_dir, backend="torch", return_report=True)
    assert report.ok and not report.ignored, report.describe()
    hf_state = load_file(str(hf_dir / "model.safetensors"))
    ours = model.state_dict()
    assert len(ours) == len(hf_state) == 90
    for name, tensor in ours.items():
        assert torch.equal(tensor, hf_state[hf_name(name)]), name
    assert model.config.encoder_hash_byte_group_size == (3, 4, 5)
    assert model.config.entropy_model.dim == 32 and not model.training
    assert all(not p.requires_grad for p in model.entropy_model.parameters())


def test_saved_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    ours = ByteLatentTransformer(preset("blt-tiny"), backend="torch").eval()
    ours.save_pretrained(tmp_path)
    hf, info = BltForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids(), use_cache=False).logits, ours(ids()), atol=1e-4, rtol=1e-4)
    again = load_pretrained(tmp_path, backend="torch")
    assert again.config == ours.config
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    model = ByteLatentTransformer(preset("blt-tiny"), backend="torch").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_transformers(tmp_path, backend="torch").lm_head.weight.dtype == torch.bfloat16
    assert load_transformers(tmp_path, backend="torch", dtype=torch.float32).lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("name", ["blt-1b", "blt-7b"])
def test_released_shapes_match_transformers(name):
    """Our module tree and transformers' agree tensor by tensor at full size (on the meta device)."""
    with torch.device("meta"):
        hf = BltForCausalLM(BltConfig(**config_to_transformers(preset(name))))
        ours = ByteLatentTransformer(preset(name))
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    our_shapes = {hf_name(k): tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == hf_shapes


def _edit_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type="llama"), "model_type must be 'blt'"),
        (lambda c: c["global_config"]["rope_parameters"].update(rope_type="linear"), "rope_type 'linear'"),
        (lambda c: c["decoder_config"].update(hidden_act="gelu"), "hidden_act must be 'silu'"),
        (lambda c: c["global_config"]["rope_parameters"].update(rope_theta=10.0), "rope_theta must agree"),
        (lambda c: c.update(patching_mode="bpe"), "patching_mode 'bpe'"),
        (lambda c: c["decoder_config"].update(hidden_size=64), "must equal dim_local_decoder"),
    ],
)
def test_transformers_config_we_cannot_run_is_refused(tmp_path, hf_dir, edit, message):
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((hf_dir / f).read_bytes())
    _edit_config(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        load_transformers(tmp_path)


def test_checkpoint_without_patcher_patches_bytes(tmp_path):
    hf_tiny_model(patch_in_forward=False).save_pretrained(tmp_path)
    model = load_transformers(tmp_path, backend="torch")
    assert model.entropy_model is None and model.config.patching_mode == "byte"
    assert model.patch(ids()).patch_lengths.tolist() == [[1] * (ids().shape[1] + 1)]


def test_loading_with_a_different_expected_config_is_refused(hf_dir):
    expected = dataclasses.replace(load_transformers(hf_dir).config, patching_threshold=2.0)
    with pytest.raises(CheckpointError, match="patching_threshold: checkpoint 1.33.* vs given 2.0"):
        load_transformers(hf_dir, config=expected)


def test_tensor_problems_are_reported_by_name(tmp_path, hf_dir):
    state = load_file(str(hf_dir / "model.safetensors"))
    del state["model.local_decoder.norm.weight"]
    state["model.local_encoder.extra.weight"] = torch.zeros(3)
    state["model.unrelated"] = torch.zeros(1)
    state["model.global_transformer.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    with pytest.raises(CheckpointError) as err:
        load_transformers(tmp_path)
    text = str(err.value)
    assert "missing (1): local_decoder.norm.weight" in text
    assert "unexpected (2): local_encoder.extra.weight, unrelated" in text
    assert "shape mismatch (1): global_transformer.layers.0.mlp.up_proj.weight: (7, 64) vs (160, 64)" in text
    model, report = load_transformers(tmp_path, strict=False, return_report=True)
    assert report.missing == ["local_decoder.norm.weight"] and len(report.unexpected) == 2
    assert torch.equal(model.local_decoder.norm.weight, torch.ones(32))  # left at its init
    assert model(ids()).isfinite().all()


# ---- original format ------------------------------------------------------------------------

# Original names of our block parameters (BLT_SPEC.md k, the conversion script's table).
_ORIGINAL = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
    "q_norm": "cross_attn_norm_q", "k_norm": "cross_attn_norm_kv",
}


def original_name(ours: str) -> str:
    special = {
        "local_encoder.embedding.byte_weight": "local_encoder.tok_embeddings.weight",
        "lm_head.weight": "local_decoder.output.weight",
        "patcher.entropy_model.embed_tokens.weight": "tok_embeddings.weight",
        "patcher.entropy_model.lm_head.weight": "output.weight",
    }
    if ours in special:
        return special[ours]
    name = ours.removeprefix("patcher.entropy_model.")
    for new, old in sorted(_ORIGINAL.items(), key=lambda kv: -len(kv[0])):
        if f".{new}." in name:
            return name.replace(f".{new}.", f".{old}.")
    return name


MODEL_ARGS = {
    "dim_local_encoder": 32, "dim_local_decoder": 32, "dim_global": 64,
    "n_layers_local_encoder": 1, "n_layers_local_decoder": 2, "n_layers_global": 2,
    "n_heads_local_encoder": 4, "n_heads_local_decoder": 4, "n_heads_global": 4,
    "multiple_of": 32, "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 500000.0,
    "vocab_size": 260, "cross_attn_encoder": True, "cross_attn_decoder": True,
    "cross_attn_init_by_pooling": True, "cross_attn_k": 2, "cross_attn_nheads": 4,
    "cross_attn_all_layers_decoder": True, "cross_attn_all_layers_encoder": False,
    "cross_attn_window_encoder": None, "cross_attn_window_decoder": None,
    "downsampling_by_pooling": "max", "encoder_hash_byte_group_size": "3,4,5",
    "encoder_hash_byte_group_vocab": 257, "encoder_hash_byte_group_nb_functions": 1,
    "local_attention_window_len": 512, "max_encoder_seq_length": 4096, "max_seqlen": 1024,
    "attn_impl": "xformers", "attn_bias_type": "causal", "patching_mode": "entropy",
    "patching_threshold": 9.9,  # ignored: the patcher args win (BLT_SPEC.md j.11)
}
ENTROPY_ARGS = {"dim": 32, "n_layers": 2, "n_heads": 4, "max_seqlen": 1024, "ffn_dim_multiplier": 1.0,
                "vocab_size": 260, "attn_bias_type": "local_block_causal"}
PATCHER_ARGS = {"patching_mode": "entropy", "threshold": 1.335442066192627, "monotonicity": False}


def test_original_args_give_the_expected_config():
    cfg = config_from_original(MODEL_ARGS, PATCHER_ARGS, ENTROPY_ARGS)
    # SwiGLU hidden = round_up(int(8 d / 3), multiple_of): 85 -> 96, 170 -> 192; entropy model 256
    assert (cfg.ffn_dim_local_encoder, cfg.ffn_dim_global, cfg.entropy_model.ffn_dim) == (96, 192, 256)
    assert cfg.encoder_hash_byte_group_size == (3, 4, 5) and cfg.patching_threshold == 1.335442066192627
    assert cfg.entropy_model.sliding_window == 512 and cfg.entropy_model.rope_theta == 10000.0
    assert not cfg.global_block_causal
    assert config_from_original({**MODEL_ARGS, "attn_bias_type": "block_causal"}).global_block_causal


def write_original(model, root, layout="consolidated", extra=None, drop=()):
    """Write ``model`` as the original release does: blt dir + sibling entropy_model dir."""
    blt, entropy = {}, {}
    tables = model.config.num_hash_tables
    for name, tensor in model.state_dict().items():
        if name in drop:
            continue
        if name == "local_encoder.embedding.hash_weight":
            for i, table in enumerate(tensor.chunk(tables)):
                blt[f"encoder_hash_tok_embedding.{i}.weight"] = table.clone()
        elif name.startswith("patcher."):
            entropy[original_name(name)] = tensor.clone()
        else:
            blt[original_name(name)] = tensor.clone()
    blt.update(extra or {})
    (root / "blt").mkdir()
    (root / "entropy_model").mkdir()
    params = {"model": MODEL_ARGS, "data": {"patcher_args": PATCHER_ARGS}, "distributed": {"model_dtype": "fp32"}}
    if layout == "consolidated":
        (root / "blt" / "params.json").write_text(json.dumps(params))
        torch.save({"model": blt}, root / "blt" / "consolidated.pth")
    else:  # the hub mirror: config.json with the model args under "args", safetensors weights
        (root / "blt" / "config.json").write_text(json.dumps({"args": MODEL_ARGS}))
        save_file(blt, str(root / "blt" / "model.safetensors"))
    (root / "entropy_model" / "params.json").write_text(
        json.dumps({"entropy_model": ENTROPY_ARGS, "data": {"patcher_args": PATCHER_ARGS}}))
    torch.save({"model": entropy}, root / "entropy_model" / "consolidated.pth")
    return root / "blt"


def original_source_model():
    torch.manual_seed(1)
    return ByteLatentTransformer(config_from_original(MODEL_ARGS, PATCHER_ARGS, ENTROPY_ARGS), backend="torch").eval()


@pytest.mark.parametrize("layout", ["consolidated", "hub"])
def test_load_original_checkpoint(tmp_path, layout):
    source = original_source_model()
    extra = {"local_encoder.rope.freqs_cis": torch.zeros(4096, 4, 2, 2)}  # derived, stored by some versions
    path = write_original(source, tmp_path, layout, extra=extra)
    model, report = load_pretrained(path, backend="torch", return_report=True)
    assert report.ok and report.ignored == ["local_encoder.rope.freqs_cis"], report.describe()
    assert model.config == source.config
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    torch.testing.assert_close(model(ids()), source(ids()), rtol=0, atol=0)


def test_original_checkpoint_problems_are_reported(tmp_path):
    path = write_original(original_source_model(), tmp_path, drop=("local_encoder.embedding.hash_weight",),
                          extra={"local_encoder.token_embedding_projection.weight": torch.zeros(32, 32)})
    with pytest.raises(CheckpointError, match=r"missing \(1\): local_encoder.embedding.hash_weight; "
                                              r"unexpected \(1\): local_encoder.token_embedding_projection.weight"):
        load_original(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"cross_attn_window_encoder": 512}, "cross_attn_window_encoder=512"),
        ({"cross_attn_nheads": 2}, "cross_attn_nheads=2"),
        ({"use_rope": False}, "use_rope=false"),
        ({"attn_bias_type": "local_block_causal"}, "attn_bias_type 'local_block_causal'"),
    ],
)
def test_original_config_we_cannot_run_is_refused(change, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_original({**MODEL_ARGS, **change}, PATCHER_ARGS, ENTROPY_ARGS)


def test_original_checkpoint_needs_its_entropy_model(tmp_path):
    path = write_original(original_source_model(), tmp_path)
    (tmp_path / "entropy_model" / "params.json").unlink()
    with pytest.raises(CheckpointError, match="no entropy model directory"):
        load_original(path)
    model = load_original(path, with_entropy_model=False, backend="torch")
    assert model.entropy_model is None
    with pytest.raises(RuntimeError, match="needs an entropy_model"):
        model(ids())
    assert model(ids(), torch.tensor([[1] * (ids().shape[1] + 1)])).isfinite().all()
