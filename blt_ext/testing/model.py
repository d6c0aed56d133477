"""Tiny random ``transformers`` BLT models, the oracle of the model's parity and checkpoint tests.

Needs ``transformers`` (a test dependency). The dimensions are those of the ``blt-tiny`` preset,
written out here by hand so that the oracle does not depend on our own config conversion.
"""

import torch
from transformers import BltConfig, BltForCausalLM, BltPatcherConfig

# transformers 5.24 added the 512-byte window of the released models (local models and patcher);
# 5.17 has no window at all. Tests on inputs longer than the window follow the installed version.
HF_LOCAL_WINDOW = getattr(BltConfig(), "local_attention_window_len", None)
HF_PATCHER_WINDOW = getattr(BltPatcherConfig(), "sliding_window", None)


def hf_tiny_config(**overrides) -> BltConfig:
    local = dict(hidden_size=32, num_attention_heads=4, intermediate_size=96, hidden_size_global=64, cross_attn_k=2)
    kwargs = dict(
        vocab_size=260,
        patching_threshold=1.335442066192627,
        cross_attn_k=2,
        encoder_hash_byte_group_size=[3, 4, 5],
        encoder_hash_byte_group_vocab=257,
        patcher_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96),
        encoder_config=dict(local, num_hidden_layers=1),
        decoder_config=dict(local, num_hidden_layers=2),
        global_config=dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=160),
    )
    kwargs.update(overrides)
    return BltConfig(**kwargs)


def hf_tiny_model(seed: int = 0, patcher_scale: float = 6.0, **overrides) -> BltForCausalLM:
    """A seeded random BltForCausalLM whose patcher head is scaled by ``patcher_scale``.

    Random weights give near-uniform predictions (entropy ~ ln 260 > threshold, every patch one
    byte); scaling the patcher's output head sharpens them so that entropies straddle the
    released threshold and patch lengths vary.
    """
    torch.manual_seed(seed)
    model = BltForCausalLM(hf_tiny_config(**overrides)).eval()
    if model.model.patcher is not None:
        with torch.no_grad():
            model.model.patcher.lm_head.weight.mul_(patcher_scale)
    return model
