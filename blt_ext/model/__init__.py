"""The BLT model on top of the blt_ext ops: config and presets, byte tokenizer, entropy model,
local encoder, global transformer, local decoder, checkpoints and generation.

>>> from blt_ext.model import ByteLatentTransformer, preset
>>> model = ByteLatentTransformer(preset("blt-tiny"), backend="torch")
>>> out = model.generate(["Hello"], max_new_bytes=8)   # random weights: random bytes
"""

from .blt import ByteLatentTransformer, GlobalTransformer, LocalDecoder, LocalEncoder
from .config import PRESETS, UNVERIFIED, BLTConfig, EntropyModelConfig, ffn_hidden_dim, preset
from .decoding import BatchDecoder
from .entropy_model import EntropyModel
from .loss import LossOutput, next_byte_loss
from .tokenizer import BOE_ID, BOS_ID, BPE_ID, EOS_ID, OFFSET, PAD_ID, VOCAB_SIZE, BatchEncoding, ByteTokenizer

__all__ = [
    "BOE_ID",
    "BOS_ID",
    "BPE_ID",
    "EOS_ID",
    "OFFSET",
    "PAD_ID",
    "PRESETS",
    "UNVERIFIED",
    "VOCAB_SIZE",
    "BLTConfig",
    "BatchDecoder",
    "BatchEncoding",
    "ByteLatentTransformer",
    "ByteTokenizer",
    "EntropyModel",
    "EntropyModelConfig",
    "GlobalTransformer",
    "LocalDecoder",
    "LocalEncoder",
    "LossOutput",
    "ffn_hidden_dim",
    "next_byte_loss",
    "preset",
]
