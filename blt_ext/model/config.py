"""Configuration of the BLT model and its entropy model, with presets (BLT_SPEC.md h).

Presets: ``blt-entropy`` (the released ~100M entropy model, an :class:`EntropyModelConfig`),
``blt-1b`` and ``blt-7b`` (the released models; the 7B values the spec flags as unverified are
listed in ``UNVERIFIED["blt-7b"]``), ``blt-small`` (a CPU demo size) and ``blt-tiny`` (tests).

>>> cfg = preset("blt-tiny")
>>> cfg.dim_local_encoder, cfg.cross_attn_k
(32, 2)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..nn import PATCHING_MODES, RELEASED_THRESHOLD
from .tokenizer import VOCAB_SIZE

POOLING_MODES = ("max", "mean", "min")


def ffn_hidden_dim(dim: int, multiple_of: int = 256, multiplier: float | None = None) -> int:
    """SwiGLU hidden size of the original code: round_up(mult * int(2 * 4 * dim / 3), multiple_of)."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def dataclass_from_dict(cls, d: dict):
    """``cls(**d)``, refusing keys that are not fields of the dataclass ``cls`` by name."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__}.from_dict: unknown fields {unknown}")
    return cls(**d)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_heads(name: str, dim: int, heads: int, kv_heads: int | None) -> None:
    _check(heads > 0 and dim % heads == 0, f"{name}: dim {dim} must be divisible by n_heads {heads}")
    _check((dim // heads) % 2 == 0, f"{name}: head_dim {dim // heads} must be even (RoPE pairs)")
    if kv_heads is not None:
        _check(
            kv_heads > 0 and heads % kv_heads == 0,
            f"{name}: n_heads {heads} must be a multiple of n_kv_heads {kv_heads}",
        )


@dataclass
class EntropyModelConfig:
    """The patcher LM: a Llama-style byte LM (pre-RMSNorm, SwiGLU, interleaved RoPE, final norm).

    Self-attention is causal, block-diagonal at EOS and limited to ``sliding_window`` keys
    (the original forces 512 when it loads the model); ``None`` removes the window.
    """

    vocab_size: int = VOCAB_SIZE
    dim: int = 768
    n_layers: int = 14
    n_heads: int = 12
    n_kv_heads: int | None = None
    ffn_dim: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seqlen: int = 8192
    sliding_window: int | None = 512

    def __post_init__(self):
        _check_heads("EntropyModelConfig", self.dim, self.n_heads, self.n_kv_heads)
        _check(self.n_layers >= 0 and self.ffn_dim > 0, "EntropyModelConfig: sizes must be positive")
        _check(
            self.sliding_window is None or self.sliding_window > 0,
            f"EntropyModelConfig: sliding_window must be None or > 0, got {self.sliding_window}",
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BLTConfig:
    """Every dimension and switch of a Byte Latent Transformer (names follow the original args).

    Local encoder and decoder share ``n_kv_heads_local``, ``norm_eps``, ``rope_theta`` and the
    self-attention ``local_attention_window_len`` (causal, block-diagonal at EOS, window in bytes;
    ``None`` = no window). Cross-attention uses the local head count (as the transformers port
    and the released models do). The global transformer is causal over patches, or block-causal
    at patches holding an EOS when ``global_block_causal`` (the original's ``attn_bias_type``
    "block_causal"). The patching fields drive :class:`blt_ext.nn.EntropyPatcher`.
    """

    vocab_size: int = VOCAB_SIZE
    # local encoder
    dim_local_encoder: int = 1024
    n_layers_local_encoder: int = 1
    n_heads_local_encoder: int = 16
    ffn_dim_local_encoder: int = 2816
    # local decoder
    dim_local_decoder: int = 1024
    n_layers_local_decoder: int = 9
    n_heads_local_decoder: int = 16
    ffn_dim_local_decoder: int = 2816
    n_kv_heads_local: int | None = None
    # global transformer
    dim_global: int = 2048
    n_layers_global: int = 25
    n_heads_global: int = 16
    n_kv_heads_global: int | None = None
    ffn_dim_global: int = 5632
    global_block_causal: bool = False
    # shared
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    local_attention_window_len: int | None = 512
    max_encoder_seq_length: int = 24576  # bytes; informational (RoPE is computed on the fly)
    max_seqlen: int = 4096  # patches; informational
    # cross-attention between bytes and patches
    cross_attn_k: int = 2
    cross_attn_all_layers_encoder: bool = False
    cross_attn_all_layers_decoder: bool = True
    pooling: str = "max"
    # hash n-gram embeddings
    encoder_hash_byte_group_size: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    encoder_hash_byte_group_nb_functions: int = 1
    encoder_hash_byte_group_vocab: int = 500002
    # patching
    patching_mode: str = "entropy"
    patching_threshold: float = RELEASED_THRESHOLD
    patching_threshold_add: float | None = None
    monotonicity: bool = False
    max_patch_length: int | None = None
    patch_size: int = 4  # static patching only
    entropy_model: EntropyModelConfig | None = field(default_factory=EntropyModelConfig)

    def __post_init__(self):
        if isinstance(self.entropy_model, dict):
            self.entropy_model = EntropyModelConfig(**self.entropy_model)
        self.encoder_hash_byte_group_size = tuple(int(n) for n in self.encoder_hash_byte_group_size)
        _check_heads("local encoder", self.dim_local_encoder, self.n_heads_local_encoder, self.n_kv_heads_local)
        _check_heads("local decoder", self.dim_local_decoder, self.n_heads_local_decoder, self.n_kv_heads_local)
        _check_heads("global transformer", self.dim_global, self.n_heads_global, self.n_kv_heads_global)
        # The decoder starts from the encoder's byte states, so both widths must agree.
        _check(
            self.dim_local_encoder == self.dim_local_decoder,
            f"BLTConfig: dim_local_encoder ({self.dim_local_encoder}) must equal dim_local_decoder "
            f"({self.dim_local_decoder}): the decoder reads the encoder's byte states",
        )
        _check(
            self.n_layers_local_encoder >= 1 and self.n_layers_local_decoder >= 1,
            "BLTConfig: the local encoder and decoder need at least one layer (they carry the cross-attention)",
        )
        _check(self.cross_attn_k >= 1, f"BLTConfig: cross_attn_k must be >= 1, got {self.cross_attn_k}")
        _check(self.vocab_size >= VOCAB_SIZE, f"BLTConfig: vocab_size must be >= {VOCAB_SIZE}")
        _check(
            self.patching_mode in PATCHING_MODES,
            f"BLTConfig: patching_mode must be one of {PATCHING_MODES}, got {self.patching_mode!r}",
        )
        _check(self.pooling in POOLING_MODES, f"BLTConfig: pooling must be one of {POOLING_MODES}, got {self.pooling!r}")
        _check(
            len(self.encoder_hash_byte_group_size) > 0 and min(self.encoder_hash_byte_group_size) >= 1,
            "BLTConfig: encoder_hash_byte_group_size must list n-gram sizes >= 1",
        )
        _check(self.encoder_hash_byte_group_nb_functions >= 1, "BLTConfig: encoder_hash_byte_group_nb_functions must be >= 1")
        _check(self.encoder_hash_byte_group_vocab >= 1, "BLTConfig: encoder_hash_byte_group_vocab must be >= 1")
        _check(
            self.local_attention_window_len is None or self.local_attention_window_len > 0,
            "BLTConfig: local_attention_window_len must be None or > 0",
        )
        _check(
            self.max_patch_length is None or self.max_patch_length >= 1,
            "BLTConfig: max_patch_length must be None or >= 1",
        )

    @property
    def num_hash_tables(self) -> int:
        return self.encoder_hash_byte_group_nb_functions * len(self.encoder_hash_byte_group_size)

    @property
    def global_input_dim(self) -> int:
        """Width of a patch entering the global transformer: the k encoder slots concatenated."""
        return self.cross_attn_k * self.dim_local_encoder

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["encoder_hash_byte_group_size"] = list(self.encoder_hash_byte_group_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BLTConfig:
        return dataclass_from_dict(cls, d)


def _entropy_released() -> EntropyModelConfig:
    return EntropyModelConfig()


def _blt_1b() -> BLTConfig:
    return BLTConfig()


def _blt_7b() -> BLTConfig:
    return BLTConfig(
        dim_local_encoder=1280,
        n_heads_local_encoder=20,
        ffn_dim_local_encoder=ffn_hidden_dim(1280),
        dim_local_decoder=1280,
        n_layers_local_decoder=6,
        n_heads_local_decoder=20,
        ffn_dim_local_decoder=ffn_hidden_dim(1280),
        dim_global=4096,
        n_layers_global=32,
        n_heads_global=32,
        ffn_dim_global=ffn_hidden_dim(4096),
        cross_attn_k=4,
    )


def _tiny_entropy() -> EntropyModelConfig:
    return EntropyModelConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=96, max_seqlen=1024)


def _blt_tiny() -> BLTConfig:
    return BLTConfig(
        dim_local_encoder=32,
        n_heads_local_encoder=4,
        ffn_dim_local_encoder=96,
        dim_local_decoder=32,
        n_layers_local_decoder=2,
        n_heads_local_decoder=4,
        ffn_dim_local_decoder=96,
        dim_global=64,
        n_layers_global=2,
        n_heads_global=4,
        ffn_dim_global=160,
        encoder_hash_byte_group_size=(3, 4, 5),
        encoder_hash_byte_group_vocab=257,
        max_encoder_seq_length=4096,
        max_seqlen=1024,
        entropy_model=_tiny_entropy(),
    )


def _entropy_small() -> EntropyModelConfig:
    return EntropyModelConfig(dim=256, n_layers=4, n_heads=4, ffn_dim=ffn_hidden_dim(256))


def _blt_small() -> BLTConfig:
    return BLTConfig(
        dim_local_encoder=256,
        n_heads_local_encoder=4,
        ffn_dim_local_encoder=ffn_hidden_dim(256),
        dim_local_decoder=256,
        n_layers_local_decoder=4,
        n_heads_local_decoder=4,
        ffn_dim_local_decoder=ffn_hidden_dim(256),
        dim_global=512,
        n_layers_global=6,
        n_heads_global=8,
        ffn_dim_global=ffn_hidden_dim(512),
        encoder_hash_byte_group_vocab=16384,
        max_encoder_seq_length=8192,
        max_seqlen=2048,
        entropy_model=_entropy_small(),
    )


_PRESETS = {
    "blt-entropy": _entropy_released,
    "blt-1b": _blt_1b,
    "blt-7b": _blt_7b,
    "blt-small": _blt_small,
    "blt-tiny": _blt_tiny,
    "blt-entropy-small": _entropy_small,
    "blt-entropy-tiny": _tiny_entropy,
}
PRESETS = tuple(_PRESETS)

# Values of the released 7B model that BLT_SPEC.md h gives from the paper's table as recalled,
# not read from a released file: check them against params.json before relying on them.
UNVERIFIED = {
    "blt-7b": (
        "dim_local_encoder",
        "dim_local_decoder",
        "n_heads_local_encoder",
        "n_heads_local_decoder",
        "n_layers_local_decoder",
        "ffn_dim_local_encoder",
        "ffn_dim_local_decoder",
        "dim_global",
        "n_layers_global",
        "n_heads_global",
        "ffn_dim_global",
        "cross_attn_k",
        "max_encoder_seq_length",
        "max_seqlen",
    ),
}


def preset(name: str) -> BLTConfig | EntropyModelConfig:
    """A fresh config for a preset name (see ``PRESETS``); entropy presets give an EntropyModelConfig."""
    try:
        return _PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}") from None
