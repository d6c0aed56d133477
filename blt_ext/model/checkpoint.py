"""Checkpoints: the transformers format (load and save) and the original format (load).

- transformers: a directory with ``config.json`` (``model_type: "blt"``) and ``model.safetensors``
  as written by ``transformers.BltForCausalLM.save_pretrained``, the entropy model included under
  ``model.patcher.*`` (BLT_SPEC.md k).
- original (facebookresearch/blt): a directory with ``params.json`` (the training args: model
  under "model", patcher settings under "data.patcher_args") and ``consolidated.pth`` (its
  "model" state dict), plus the entropy model's own directory of the same two files (its args
  under "entropy_model"). The hub mirror of the same files (``config.json`` with the model args
  under "args", ``model.safetensors``) is read too.

Loading checks every tensor: checkpoint keys that map to nothing ("unexpected"), model tensors
the checkpoint lacks ("missing") and shape mismatches are reported by name in a
:class:`LoadReport`; with ``strict=True`` (default) any of them raises :class:`CheckpointError`.
RoPE tables stored by some versions are derived data: they are listed as ``ignored``.
A configuration this model cannot reproduce raises :class:`CheckpointError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import NamedTuple

import torch

from .blt import ByteLatentTransformer
from .config import BLTConfig, EntropyModelConfig, ffn_hidden_dim

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PARAMS_NAME = "params.json"
CONSOLIDATED_NAME = "consolidated.pth"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model or the model's configuration."""


class LoadReport(NamedTuple):
    missing: list[str]  # model tensors (our names) the checkpoint lacks
    unexpected: list[str]  # checkpoint tensors (checkpoint names) that map to no model tensor
    mismatched: list[str]  # "name: checkpoint shape vs model shape"
    ignored: list[str]  # derived tensors deliberately not loaded (RoPE tables)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        for title, names in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("shape mismatch", self.mismatched), ("ignored", self.ignored)):
            if names:
                parts.append(f"{title} ({len(names)}): " + ", ".join(names))
        return "; ".join(parts) or "all tensors loaded"


# ---------------------------------------------------------------------------------------------
# transformers format
# ---------------------------------------------------------------------------------------------


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckpointError(msg)


def _rope_theta(sub: dict, where: str) -> float:
    params = sub.get("rope_parameters") or {}
    rope_type = params.get("rope_type") or (sub.get("rope_scaling") or {}).get("rope_type") or "default"
    _require(rope_type == "default", f"{where}: rope_type {rope_type!r} is not supported (only 'default')")
    theta = params.get("rope_theta", sub.get("rope_theta"))
    _require(theta is not None, f"{where}: no rope_theta in rope_parameters")
    return float(theta)


def _kv_heads(sub: dict) -> int | None:
    kv = sub.get("num_key_value_heads")
    return None if kv in (None, sub["num_attention_heads"]) else int(kv)


def config_from_transformers(hf: dict) -> BLTConfig:
    """A BLTConfig from a transformers ``config.json`` dict; raises CheckpointError on what we cannot run."""
    _require(hf.get("model_type") == "blt", f"config.json: model_type must be 'blt', got {hf.get('model_type')!r}")
    enc, dec, glob = hf["encoder_config"], hf["decoder_config"], hf["global_config"]
    for name, sub in (("encoder_config", enc), ("decoder_config", dec), ("global_config", glob)):
        _require(sub.get("hidden_act", "silu") == "silu", f"config.json: {name}.hidden_act must be 'silu'")
    thetas = {_rope_theta(sub, f"config.json: {name}") for name, sub in
              (("encoder_config", enc), ("decoder_config", dec), ("global_config", glob))}
    _require(len(thetas) == 1, f"config.json: encoder, decoder and global rope_theta must agree, got {sorted(thetas)}")
    eps = {enc["rms_norm_eps"], dec["rms_norm_eps"], glob["rms_norm_eps"]}
    _require(len(eps) == 1, f"config.json: rms_norm_eps must agree across encoder, decoder and global, got {sorted(eps)}")
    _require(_kv_heads(enc) == _kv_heads(dec),
             "config.json: encoder and decoder num_key_value_heads must describe the same grouping")
    k = hf.get("cross_attn_k", 2)
    for name, sub in (("encoder_config", enc), ("decoder_config", dec)):
        _require(sub.get("cross_attn_k", k) == k, f"config.json: {name}.cross_attn_k differs from cross_attn_k={k}")
        _require(sub.get("hidden_size_global", glob["hidden_size"]) == glob["hidden_size"],
                 f"config.json: {name}.hidden_size_global must equal global_config.hidden_size")
    mode = hf.get("patching_mode", "entropy")
    _require(mode in ("entropy", "byte"), f"config.json: patching_mode {mode!r} is not supported")
    has_patcher = bool(hf.get("patch_in_forward", True)) and hf.get("patcher_config") is not None
    if not has_patcher:
        mode = "byte"  # what transformers does without a patcher: one-byte patches

    entropy = None
    if has_patcher:
        pc = hf["patcher_config"]
        entropy = EntropyModelConfig(
            vocab_size=pc.get("vocab_size", 260),
            dim=pc["hidden_size"],
            n_layers=pc["num_hidden_layers"],
            n_heads=pc["num_attention_heads"],
            n_kv_heads=_kv_heads(pc),
            ffn_dim=pc["intermediate_size"],
            norm_eps=pc.get("rms_norm_eps", 1e-5),
            rope_theta=_rope_theta(pc, "config.json: patcher_config"),
            max_seqlen=pc.get("max_position_embeddings", 8192),
            # Written only by transformers >= 5.24; the released entropy model uses 512.
            sliding_window=pc.get("sliding_window", 512),
        )
    return BLTConfig(
        vocab_size=hf.get("vocab_size", 260),
        dim_local_encoder=enc["hidden_size"],
        n_layers_local_encoder=enc["num_hidden_layers"],
        n_heads_local_encoder=enc["num_attention_heads"],
        ffn_dim_local_encoder=enc["intermediate_size"],
        dim_local_decoder=dec["hidden_size"],
        n_layers_local_decoder=dec["num_hidden_layers"],
        n_heads_local_decoder=dec["num_attention_heads"],
        ffn_dim_local_decoder=dec["intermediate_size"],
        n_kv_heads_local=_kv_heads(enc),
        dim_global=glob["hidden_size"],
        n_layers_global=glob["num_hidden_layers"],
        n_heads_global=glob["num_attention_heads"],
        n_kv_heads_global=_kv_heads(glob),
        ffn_dim_global=glob["intermediate_size"],
        norm_eps=eps.pop(),
        rope_theta=thetas.pop(),
        # Written only by transformers >= 5.24; the released models use 512 (5.17 applies none).
        local_attention_window_len=hf.get("local_attention_window_len", 512),
        max_encoder_seq_length=enc.get("max_position_embeddings", 24576),
        max_seqlen=glob.get("max_position_embeddings", 4096),
        cross_attn_k=k,
        cross_attn_all_layers_encoder=enc.get("cross_attn_all_layers", False),
        cross_attn_all_layers_decoder=dec.get("cross_attn_all_layers", True),
        encoder_hash_byte_group_size=tuple(hf.get("encoder_hash_byte_group_size") or (3, 4, 5, 6, 7, 8)),
        encoder_hash_byte_group_nb_functions=hf.get("encoder_hash_byte_group_nb_functions", 1),
        encoder_hash_byte_group_vocab=hf.get("encoder_hash_byte_group_vocab", 500002),
        patching_mode=mode,
        patching_threshold=hf.get("patching_threshold", 1.335442066192627),
        # transformers ignores these two; a converted config may carry the original's values.
        patching_threshold_add=hf.get("patching_threshold_add") or None,
        monotonicity=bool(hf.get("monotonicity", False)),
        max_patch_length=hf.get("max_patch_length"),
        patch_size=int(hf.get("patch_size", 4)),
        entropy_model=entropy,
    )


def _rope_params(theta: float) -> dict:
    return {"rope_theta": float(theta), "rope_type": "default"}


def config_to_transformers(config: BLTConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The transformers ``config.json`` dict of ``config``; raises CheckpointError if it has no equivalent."""
    c = config
    _require(c.pooling == "max", "transformers format: only pooling='max' exists there")
    _require(not c.global_block_causal, "transformers format: the global transformer there is plain causal")
    _require(c.patching_mode in ("entropy", "byte"), f"transformers format: patching_mode {c.patching_mode!r} does not exist there")
    dtype_name = str(dtype).removeprefix("torch.")

    def local(dim, layers, heads, ffn, all_layers, model_type):
        return {
            "model_type": model_type,
            "vocab_size": c.vocab_size,
            "cross_attn_all_layers": all_layers,
            "cross_attn_k": c.cross_attn_k,
            "hidden_size_global": c.dim_global,
            "hidden_size": dim,
            "num_attention_heads": heads,
            "num_key_value_heads": c.n_kv_heads_local or heads,
            "num_hidden_layers": layers,
            "rms_norm_eps": c.norm_eps,
            "dropout": 0.0,
            "max_position_embeddings": c.max_encoder_seq_length,
            "rope_parameters": _rope_params(c.rope_theta),
            "hidden_act": "silu",
            "intermediate_size": ffn,
            "tie_word_embeddings": False,
        }

    encoder = local(c.dim_local_encoder, c.n_layers_local_encoder, c.n_heads_local_encoder,
                    c.ffn_dim_local_encoder, c.cross_attn_all_layers_encoder, "blt_local_encoder")
    encoder["sliding_window"] = c.local_attention_window_len
    decoder = local(c.dim_local_decoder, c.n_layers_local_decoder, c.n_heads_local_decoder,
                    c.ffn_dim_local_decoder, c.cross_attn_all_layers_decoder, "blt_local_decoder")
    glob = {
        "model_type": "blt_global_transformer",
        "hidden_size": c.dim_global,
        "num_attention_heads": c.n_heads_global,
        "num_key_value_heads": c.n_kv_heads_global or c.n_heads_global,
        "num_hidden_layers": c.n_layers_global,
        "rms_norm_eps": c.norm_eps,
        "dropout": 0.0,
        "max_position_embeddings": c.max_seqlen,
        "rope_parameters": _rope_params(c.rope_theta),
        "hidden_act": "silu",
        "intermediate_size": c.ffn_dim_global,
        "encoder_cross_output_size": c.global_input_dim if c.global_input_dim != c.dim_global else None,
        "tie_word_embeddings": False,
    }
    out = {
        "architectures": ["BltForCausalLM"],
        "model_type": "blt",
        "dtype": dtype_name,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_seqlen,
        "patch_in_forward": c.entropy_model is not None,
        "patch_size": int(c.patch_size),
        "patching_mode": c.patching_mode,
        "patching_threshold": c.patching_threshold,
        "patching_batch_size": 1,
        "max_patch_length": c.max_patch_length,
        "local_attention_window_len": c.local_attention_window_len,
        "cross_attn_k": c.cross_attn_k,
        "encoder_hash_byte_group_size": list(c.encoder_hash_byte_group_size),
        "encoder_hash_byte_group_vocab": c.encoder_hash_byte_group_vocab,
        "encoder_hash_byte_group_nb_functions": c.encoder_hash_byte_group_nb_functions,
        "encoder_config": encoder,
        "decoder_config": decoder,
        "global_config": glob,
        "rope_parameters": _rope_params(c.rope_theta),
        "tie_word_embeddings": False,
        "use_cache": False,
    }
    if c.patching_threshold_add is not None or c.monotonicity:
        out["patching_threshold_add"] = c.patching_threshold_add
        out["monotonicity"] = c.monotonicity
    e = c.entropy_model
    if e is not None:
        out["patcher_config"] = {
            "model_type": "blt_patcher",
            "vocab_size": e.vocab_size,
            "hidden_size": e.dim,
            "num_hidden_layers": e.n_layers,
            "num_attention_heads": e.n_heads,
            "num_key_value_heads": e.n_kv_heads or e.n_heads,
            "max_position_embeddings": e.max_seqlen,
            "rms_norm_eps": e.norm_eps,
            "dropout": 0.0,
            "intermediate_size": e.ffn_dim,
            "rope_parameters": _rope_params(e.rope_theta),
            "sliding_window": e.sliding_window,
            "tie_word_embeddings": False,
        }
    return out


_HF_SPECIAL = {
    "model.local_encoder.embed_tokens.weight": "local_encoder.embedding.byte_weight",
    "model.encoder_hash_tok_embedding.weight": "local_encoder.embedding.hash_weight",
    "lm_head.weight": "lm_head.weight",
}
_HF_SPECIAL_INV = {v: k for k, v in _HF_SPECIAL.items()}


def _from_transformers_name(key: str) -> str | None:
    if key in _HF_SPECIAL:
        return _HF_SPECIAL[key]
    if key.startswith("model.patcher."):
        return "patcher.entropy_model." + key[len("model.patcher."):]
    if key.startswith("model."):
        return key[len("model."):]
    return None


def _to_transformers_name(key: str) -> str:
    if key in _HF_SPECIAL_INV:
        return _HF_SPECIAL_INV[key]
    if key.startswith("patcher.entropy_model."):
        return "model.patcher." + key[len("patcher.entropy_model."):]
    return "model." + key


def _is_rope_table(key: str) -> bool:
    return key.endswith((".inv_freq", ".original_inv_freq", ".freqs_cis")) or key == "freqs_cis"


def state_dict_from_transformers(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(our state dict, unexpected checkpoint keys, ignored keys) of a transformers state dict."""
    out, unexpected, ignored = {}, [], []
    for key, tensor in sd.items():
        if _is_rope_table(key):
            ignored.append(key)
            continue
        name = _from_transformers_name(key)
        if name is None:
            unexpected.append(key)
        else:
            out[name] = tensor
    return out, unexpected, ignored


def state_dict_to_transformers(model: ByteLatentTransformer) -> dict[str, torch.Tensor]:
    return {_to_transformers_name(k): v.detach().contiguous() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# original format
# ---------------------------------------------------------------------------------------------

_ORIG_BLOCK = [
    (r"attention\.w(?P<w>[qkvo])\.weight", r"self_attn.\g<w>_proj.weight"),
    (r"feed_forward\.w1\.weight", "mlp.gate_proj.weight"),
    (r"feed_forward\.w3\.weight", "mlp.up_proj.weight"),
    (r"feed_forward\.w2\.weight", "mlp.down_proj.weight"),
    (r"attention_norm\.weight", "input_layernorm.weight"),
    (r"ffn_norm\.weight", "post_attention_layernorm.weight"),
]
_ORIG_CROSS = [
    (r"w(?P<w>[qkvo])\.weight", r"\g<w>_proj.weight"),
    (r"cross_attn_norm_q\.weight", "q_norm.weight"),
    (r"cross_attn_norm_kv\.weight", "k_norm.weight"),
]
_ORIG_RULES = [
    (re.compile(rf"^(?P<mod>local_encoder|local_decoder|global_transformer)\.layers\.(?P<i>\d+)\.{pat}$"),
     rf"\g<mod>.layers.\g<i>.{rep}")
    for pat, rep in _ORIG_BLOCK
] + [
    (re.compile(rf"^(?P<mod>local_encoder|local_decoder)\.cross_attn_layers\.(?P<i>\d+)\.{pat}$"),
     rf"\g<mod>.cross_attn_layers.\g<i>.{rep}")
    for pat, rep in _ORIG_CROSS
] + [
    (re.compile(r"^local_encoder\.tok_embeddings\.weight$"), "local_encoder.embedding.byte_weight"),
    (re.compile(r"^local_decoder\.output\.weight$"), "lm_head.weight"),
    (re.compile(r"^(local_encoder|local_decoder)\.patch_embedding_projection\.weight$"), r"\1.patch_embedding_projection.weight"),
    (re.compile(r"^global_transformer\.token_embedding_projection\.weight$"), "global_transformer.token_embedding_projection.weight"),
    (re.compile(r"^local_decoder\.norm\.weight$"), "local_decoder.norm.weight"),
]
_ORIG_ENTROPY_RULES = [
    (re.compile(rf"^layers\.(?P<i>\d+)\.{pat}$"), rf"patcher.entropy_model.layers.\g<i>.{rep}")
    for pat, rep in _ORIG_BLOCK
] + [
    (re.compile(r"^tok_embeddings\.weight$"), "patcher.entropy_model.embed_tokens.weight"),
    (re.compile(r"^norm\.weight$"), "patcher.entropy_model.norm.weight"),
    (re.compile(r"^output\.weight$"), "patcher.entropy_model.lm_head.weight"),
]
_HASH_TABLE = re.compile(r"^encoder_hash_tok_embedding\.(\d+)\.weight$")


def _map_original(sd: dict, rules, prefix: str, out: dict, unexpected: list, ignored: list) -> dict[int, torch.Tensor]:
    tables = {}
    for key, tensor in sd.items():
        if _is_rope_table(key):
            ignored.append(prefix + key)
            continue
        m = _HASH_TABLE.match(key)
        if m and not prefix:
            tables[int(m.group(1))] = tensor
            continue
        for pattern, rep in rules:
            if pattern.match(key):
                out[pattern.sub(rep, key)] = tensor
                break
        else:
            unexpected.append(prefix + key)
    return tables


def _fuse_hash_tables(tables: dict[int, torch.Tensor], config: BLTConfig, out: dict, unexpected: list) -> None:
    """Concatenate the original's per-(function, n) tables into the packed [tables*V, D] weight."""
    n = config.num_hash_tables
    extra = sorted(i for i in tables if i >= n)
    unexpected.extend(f"encoder_hash_tok_embedding.{i}.weight" for i in extra)
    if all(i in tables for i in range(n)):
        out["local_encoder.embedding.hash_weight"] = torch.cat([tables[i] for i in range(n)], dim=0)
    # otherwise the packed weight stays absent and is reported missing


def _truthy(value) -> bool:
    return value not in (None, False, "", 0)


def config_from_original(model_args: dict, patcher_args: dict | None = None, entropy_args: dict | None = None) -> BLTConfig:
    """A BLTConfig from the original ``ByteLatentTransformerArgs`` (and patcher / entropy-model args).

    Only what ``load_entropy_model`` reads is taken from the entropy args (dim, n_layers,
    n_heads, max_seqlen, ffn_dim_multiplier, vocab_size); like it, the window is 512 and the
    other values are the LMTransformer defaults.
    """
    a = model_args
    where = "params.json model"
    _require(a.get("use_rope", True), f"{where}: use_rope=false (learned positions) is not supported")
    _require(a.get("non_linearity", "swiglu") == "swiglu", f"{where}: only non_linearity 'swiglu' is supported")
    _require(a.get("norm_type", "rmsnorm") == "rmsnorm", f"{where}: only norm_type 'rmsnorm' is supported")
    for flag in ("cross_attn_encoder", "cross_attn_decoder", "cross_attn_init_by_pooling"):
        _require(a.get(flag, False), f"{where}: {flag}=false is not supported (the released models set it)")
    for key in ("cross_attn_window_encoder", "cross_attn_window_decoder"):
        _require(a.get(key) is None, f"{where}: {key}={a.get(key)} (windowed cross-attention) is not supported")
    _require(not a.get("encoder_enable_byte_ngrams", False), f"{where}: encoder_enable_byte_ngrams is not supported")
    hash_sizes = a.get("encoder_hash_byte_group_size")
    _require(hash_sizes is not None, f"{where}: encoder_hash_byte_group_size is required (hash embeddings)")
    if isinstance(hash_sizes, str):
        hash_sizes = [int(x) for x in hash_sizes.split(",") if x]
    for side in ("encoder", "decoder"):
        heads = a.get(f"n_heads_local_{side}", 8)
        xheads = a.get("cross_attn_nheads")
        _require(xheads in (None, heads),
                 f"{where}: cross_attn_nheads={xheads} differs from n_heads_local_{side}={heads}, not supported")
    pooling = a.get("downsampling_by_pooling") or "max"
    _require(pooling in ("max", "mean", "min", "avg"), f"{where}: downsampling_by_pooling {pooling!r} is not supported")
    attn_bias = a.get("attn_bias_type", "causal")
    _require(attn_bias in (None, "causal", "block_causal"), f"{where}: global attn_bias_type {attn_bias!r} is not supported")
    multiple_of = a.get("multiple_of", 256)
    mult = a.get("ffn_dim_multiplier", 1.0)

    p = dict(patcher_args or {})
    mode = p.get("patching_mode", a.get("patching_mode")) or "entropy"
    _require(mode in ("entropy", "space", "static", "byte"), f"params.json: patching_mode {mode!r} is not supported")
    entropy = None
    if entropy_args is not None:
        e = entropy_args
        entropy = EntropyModelConfig(
            vocab_size=e["vocab_size"],
            dim=e["dim"],
            n_layers=e["n_layers"],
            n_heads=e["n_heads"],
            ffn_dim=ffn_hidden_dim(e["dim"], 256, e.get("ffn_dim_multiplier")),
            max_seqlen=e.get("max_seqlen", 8192),
            sliding_window=512,
        )
    dim_enc, dim_dec, dim_glob = a.get("dim_local_encoder", 512), a.get("dim_local_decoder", 512), a.get("dim_global", 512)
    threshold = p.get("threshold", a.get("patching_threshold"))
    return BLTConfig(
        vocab_size=a.get("vocab_size", 260) + a.get("pm_size", 0),
        dim_local_encoder=dim_enc,
        n_layers_local_encoder=a.get("n_layers_local_encoder", 8),
        n_heads_local_encoder=a.get("n_heads_local_encoder", 8),
        ffn_dim_local_encoder=ffn_hidden_dim(dim_enc, multiple_of, mult),
        dim_local_decoder=dim_dec,
        n_layers_local_decoder=a.get("n_layers_local_decoder", 8),
        n_heads_local_decoder=a.get("n_heads_local_decoder", 8),
        ffn_dim_local_decoder=ffn_hidden_dim(dim_dec, multiple_of, mult),
        n_kv_heads_local=a.get("n_kv_heads"),
        dim_global=dim_glob,
        n_layers_global=a.get("n_layers_global", 8),
        n_heads_global=a.get("n_heads_global", 8),
        n_kv_heads_global=a.get("n_kv_heads_global"),
        ffn_dim_global=ffn_hidden_dim(dim_glob, multiple_of, mult),
        global_block_causal=attn_bias == "block_causal",
        norm_eps=a.get("norm_eps", 1e-5),
        rope_theta=a.get("rope_theta", 10000.0),
        local_attention_window_len=a.get("local_attention_window_len"),
        max_encoder_seq_length=a.get("max_encoder_seq_length") or a.get("max_seqlen", 1024),
        max_seqlen=a.get("max_seqlen", 1024),
        cross_attn_k=a.get("cross_attn_k") or 1,
        cross_attn_all_layers_encoder=a.get("cross_attn_all_layers_encoder", False),
        cross_attn_all_layers_decoder=a.get("cross_attn_all_layers_decoder", False),
        pooling="mean" if pooling == "avg" else pooling,
        encoder_hash_byte_group_size=tuple(hash_sizes),
        encoder_hash_byte_group_nb_functions=a.get("encoder_hash_byte_group_nb_functions", 3),
        encoder_hash_byte_group_vocab=a.get("encoder_hash_byte_group_vocab", 30000),
        patching_mode=mode,
        patching_threshold=1.335442066192627 if threshold is None else threshold,
        patching_threshold_add=p.get("threshold_add", a.get("patching_threshold_add")),
        monotonicity=bool(p.get("monotonicity", a.get("monotonicity", False))),
        max_patch_length=p.get("max_patch_length", a.get("max_patch_length")),
        # static patching takes whole bytes; the original default 4.5 becomes 4
        patch_size=int(p.get("patch_size", a.get("patch_size")) or 4),
        entropy_model=entropy,
    )


# ---------------------------------------------------------------------------------------------
# loading into a model
# ---------------------------------------------------------------------------------------------


def _config_differences(a: BLTConfig, b: BLTConfig) -> list[str]:
    return [
        f"{f.name}: checkpoint {getattr(b, f.name)!r} vs given {getattr(a, f.name)!r}"
        for f in dataclasses.fields(a)
        if getattr(a, f.name) != getattr(b, f.name)
    ]


def _build_and_load(
    config: BLTConfig,
    state: dict[str, torch.Tensor],
    unexpected: list[str],
    ignored: list[str],
    *,
    expected_config: BLTConfig | None,
    strict: bool,
    backend: str,
    attn_impl: str,
    device,
    dtype,
) -> tuple[ByteLatentTransformer, LoadReport]:
    if expected_config is not None:
        diffs = _config_differences(expected_config, config)
        if diffs:
            raise CheckpointError("checkpoint configuration differs from the given config: " + "; ".join(diffs))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ByteLatentTransformer(config, backend, attn_impl).state_dict().items()}
    missing = sorted(set(shapes) - set(state))
    mismatched = sorted(
        f"{k}: {tuple(v.shape)} vs {tuple(shapes[k])}" for k, v in state.items() if k in shapes and v.shape != shapes[k]
    )
    unexpected = sorted(unexpected + [k for k in state if k not in shapes])
    report = LoadReport(missing, unexpected, mismatched, sorted(ignored))
    if strict and not report.ok:
        raise CheckpointError(f"checkpoint does not match the model: {report.describe()}")
    if dtype is None:
        dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    loadable = {k: v for k, v in state.items() if k in shapes and v.shape == shapes[k]}
    if report.missing or report.mismatched:
        model = ByteLatentTransformer(config, backend, attn_impl)
        model.load_state_dict(loadable, strict=False)
    else:  # every tensor comes from the checkpoint: skip the random init
        with torch.device("meta"):
            model = ByteLatentTransformer(config, backend, attn_impl)
        model.load_state_dict(loadable, strict=False, assign=True)
    model = model.to(device=device, dtype=dtype)
    if model.entropy_model is not None:
        model.entropy_model.requires_grad_(False)
    return model.eval(), report


def load_transformers(
    path,
    *,
    config: BLTConfig | None = None,
    strict: bool = True,
    backend: str = "ext",
    attn_impl: str = "sdpa",
    device=None,
    dtype: torch.dtype | None = None,
    return_report: bool = False,
):
    """Load a ``BltForCausalLM.save_pretrained`` directory (``config.json`` + ``model.safetensors``).

    ``config`` (optional) is the configuration the caller expects; a checkpoint with a different
    one raises. ``dtype=None`` keeps the checkpoint's dtype. Returns the model in eval mode (and
    the LoadReport with ``return_report``).
    """
    from safetensors.torch import load_file

    path = Path(path)
    hf = json.loads((path / CONFIG_NAME).read_text())
    ckpt_config = config_from_transformers(hf)
    state, unexpected, ignored = state_dict_from_transformers(load_file(str(path / WEIGHTS_NAME)))
    model, report = _build_and_load(ckpt_config, state, unexpected, ignored, expected_config=config, strict=strict,
                                    backend=backend, attn_impl=attn_impl, device=device, dtype=dtype)
    return (model, report) if return_report else model


def _read_original_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(args json, state dict) of an original-format directory (or its hub mirror)."""
    if (path / PARAMS_NAME).exists():
        args = json.loads((path / PARAMS_NAME).read_text())
    elif (path / CONFIG_NAME).exists() and "args" in json.loads((path / CONFIG_NAME).read_text()):
        args = {"model": json.loads((path / CONFIG_NAME).read_text())["args"]}
    else:
        raise CheckpointError(f"{path}: no {PARAMS_NAME} (nor a config.json with 'args') found")
    if (path / CONSOLIDATED_NAME).exists():
        state = torch.load(path / CONSOLIDATED_NAME, map_location="cpu", weights_only=True)
        state = state.get("model", state)
    elif (path / WEIGHTS_NAME).exists():
        from safetensors.torch import load_file

        state = load_file(str(path / WEIGHTS_NAME))
    else:
        raise CheckpointError(f"{path}: no {CONSOLIDATED_NAME} (nor {WEIGHTS_NAME}) found")
    return args, state


def load_original(
    path,
    entropy_model_dir=None,
    *,
    with_entropy_model: bool = True,
    config: BLTConfig | None = None,
    strict: bool = True,
    backend: str = "ext",
    attn_impl: str = "sdpa",
    device=None,
    dtype: torch.dtype | None = None,
    return_report: bool = False,
):
    """Load an original-format BLT directory and its entropy model directory.

    ``entropy_model_dir`` defaults to ``path/entropy_model`` or a sibling ``entropy_model``
    (the layout of the released ``hf-weights``). ``with_entropy_model=False`` loads the BLT alone
    (it then needs explicit patch lengths in entropy mode).
    """
    path = Path(path)
    args, blt_state = _read_original_dir(path)
    _require("model" in args, f"{path / PARAMS_NAME}: no 'model' section")
    entropy_args, entropy_state, patcher_args = None, {}, (args.get("data") or {}).get("patcher_args")
    if with_entropy_model:
        candidates = [Path(entropy_model_dir)] if entropy_model_dir is not None else [
            path / "entropy_model", path.parent / "entropy_model"]
        found = next((d for d in candidates if (d / PARAMS_NAME).exists()), None)
        _require(found is not None, f"no entropy model directory with {PARAMS_NAME} at {[str(d) for d in candidates]}; "
                                    "pass entropy_model_dir=..., or with_entropy_model=False")
        e_args, entropy_state = _read_original_dir(found)
        _require("entropy_model" in e_args, f"{found / PARAMS_NAME}: no 'entropy_model' section")
        entropy_args = e_args["entropy_model"]
        patcher_args = patcher_args or (e_args.get("data") or {}).get("patcher_args")
    ckpt_config = config_from_original(args["model"], patcher_args, entropy_args)

    state, unexpected, ignored = {}, [], []
    tables = _map_original(blt_state, _ORIG_RULES, "", state, unexpected, ignored)
    _fuse_hash_tables(tables, ckpt_config, state, unexpected)
    _map_original(entropy_state, _ORIG_ENTROPY_RULES, "entropy_model/", state, unexpected, ignored)
    model, report = _build_and_load(ckpt_config, state, unexpected, ignored, expected_config=config, strict=strict,
                                    backend=backend, attn_impl=attn_impl, device=device, dtype=dtype)
    return (model, report) if return_report else model


def load_pretrained(path, **kwargs):
    """Load either format, chosen by the files present; keyword arguments as the two loaders."""
    path = Path(path)
    if (path / CONFIG_NAME).exists() and json.loads((path / CONFIG_NAME).read_text()).get("model_type") == "blt":
        return load_transformers(path, **kwargs)
    if (path / PARAMS_NAME).exists() or (path / CONFIG_NAME).exists():
        return load_original(path, **kwargs)
    raise CheckpointError(f"{path}: neither a transformers BLT checkpoint (config.json) nor an original one (params.json)")


def save_transformers(model: ByteLatentTransformer, path) -> None:
    """Write ``config.json`` + ``model.safetensors`` loadable by ``transformers.BltForCausalLM``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = model.lm_head.weight.dtype
    hf = config_to_transformers(model.config, dtype)
    state = {k: v.cpu() for k, v in state_dict_to_transformers(model).items()}
    (path / CONFIG_NAME).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
