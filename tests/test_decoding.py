"""KV-cached decoding against the full forward: logits at every step, patches, and generation."""

import dataclasses

import pytest
import torch

from blt_ext.model import ByteLatentTransformer, ByteTokenizer, preset
from blt_ext.model.decoding import BatchDecoder
from blt_ext.model.generate import generate

TOK = ByteTokenizer()
PROMPT = "Cached decoding: one byte, one step."


def blt(device="cpu", **changes):
    """blt-tiny with a sharpened patcher (entropies on both sides of the threshold); ``changes``
    go to the config, ``entropy_window`` to the entropy model's."""
    config = preset("blt-tiny")
    if "entropy_window" in changes:
        entropy = dataclasses.replace(config.entropy_model, sliding_window=changes.pop("entropy_window"))
        config = dataclasses.replace(config, entropy_model=entropy)
    torch.manual_seed(0)
    model = ByteLatentTransformer(dataclasses.replace(config, **changes), backend="ext").to(device).eval()
    with torch.no_grad():
        model.entropy_model.lm_head.weight.mul_(6.0)
    return model


CONFIGS = {
    "default": {},
    "global block-causal at EOS patches": {"global_block_causal": True},
    "windows bind": {"local_attention_window_len": 7, "entropy_window": 5},
    "cross-attention in all layers": {"cross_attn_all_layers_encoder": True, "cross_attn_all_layers_decoder": True,
                                      "n_layers_local_encoder": 2},
    "max patch length 3, monotonic": {"max_patch_length": 3, "monotonicity": True, "patching_threshold": 0.1},
    "space patching": {"patching_mode": "space"},
    "byte patching": {"patching_mode": "byte"},
    "static patching": {"patching_mode": "static", "patch_size": 3},
}


@pytest.mark.parametrize("batched_prefill", [False, True], ids=["prefill per row", "prefill together"])
@pytest.mark.parametrize("changes", CONFIGS.values(), ids=CONFIGS.keys())
def test_logits_equal_the_full_forward_at_every_step(device, changes, batched_prefill):
    """Three rows of different lengths (one with an EOS inside: documents split the local masks
    and the global block-causal mask), prefilled one by one or in one padded batch, step
    together; row 1 sits out some steps."""
    model = blt(device, **changes)
    prompts = [
        TOK.encode("a first document", add_eos=True) + TOK.encode(PROMPT, add_eos=False),
        TOK.encode("BLT", add_eos=False),
        TOK.encode(PROMPT * 2, add_eos=False),
    ]
    g = torch.Generator().manual_seed(0)
    decoder = BatchDecoder(model, len(prompts))
    with torch.inference_mode():
        ids = [torch.tensor(prompt, device=device) for prompt in prompts]
        if batched_prefill:
            prefilled = decoder.prefill_rows([0, 1, 2], ids)
        else:
            prefilled = [decoder.prefill(row, row_ids) for row, row_ids in enumerate(ids)]
        for got, prompt in zip(prefilled, prompts):
            torch.testing.assert_close(got, model(torch.tensor([prompt], device=device))[0], atol=1e-4, rtol=1e-4)
        for step in range(40):
            rows = [0, 2] if step % 3 == 1 else [0, 1, 2]
            new = torch.randint(4, 260, (len(rows),), generator=g)
            for row, byte in zip(rows, new.tolist()):
                prompts[row].append(byte)
            got = decoder.step(rows, new.to(device))
            for i, row in enumerate(rows):
                want = model(torch.tensor([prompts[row]], device=device))[0, -1]
                torch.testing.assert_close(got[i], want, atol=1e-4, rtol=1e-4, msg=f"row {row}, step {step}")
        for row, tokens in enumerate(prompts):
            full = model.patch(torch.tensor([tokens], device=device)).patch_lengths
            assert torch.equal(decoder.patch_lengths(row), full)
            # the global transformer ran once per complete patch: all but the last (virtual byte) one
            assert decoder.complete_patches(row) == full.shape[1] - 1
            if changes.get("patching_mode") is None and row != 1:
                assert 1 < full.shape[1] < len(tokens) - 8  # patches of several bytes: entropies mattered


def test_bad_calls_are_refused(device):
    with pytest.raises(ValueError, match=r"rows must be >= 1, got 0"):
        BatchDecoder(blt(device), 0)
    with pytest.raises(TypeError, match=r"model must be a ByteLatentTransformer, got Linear"):
        BatchDecoder(torch.nn.Linear(2, 2))
    decoder = BatchDecoder(blt(device), 2)
    with pytest.raises(ValueError, match=r"prefill: rows must be indices in \[0, 2\), got \[2\]"):
        decoder.prefill(2, torch.tensor([1, 5]))
    with pytest.raises(ValueError, match=r"step: rows must be indices in \[0, 2\), got \[\]"):
        decoder.step([], torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids must be 1-D and non-empty, got shape \(0,\)"):
        decoder.prefill(0, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"rows must be distinct and prefilled, got \[0\]"):
        decoder.step([0], torch.tensor([5]))
    with pytest.raises(ValueError, match=r"prefill: rows must be distinct, one per prompt, got \[0, 1\] for 1 prompts"):
        decoder.prefill_rows([0, 1], [torch.tensor([1, 5])])
    with pytest.raises(ValueError, match=r"prefill: rows must be distinct, one per prompt, got \[1, 1\] for 2 prompts"):
        decoder.prefill_rows([1, 1], [torch.tensor([1, 5]), torch.tensor([1])])
    decoder.prefill(0, torch.tensor([1, 5, 6]))
    with pytest.raises(ValueError, match=r"row 0 already holds 3 bytes; use step"):
        decoder.prefill(0, torch.tensor([7]))
    with pytest.raises(ValueError, match=r"ids must be \[1\] \(one per row\), got \(2,\)"):
        decoder.step([0], torch.tensor([5, 6]))


@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 20, "seed": 3}], ids=["greedy", "sampled"])
def test_cached_generation_gives_the_uncached_outputs(device, sampling, backend):
    model = blt(device)
    model.backend = backend
    prompts = ["Once upon a time", "BLT", "A much longer prompt about bytes, patches and entropy."]
    cached = model.generate(prompts, max_new_bytes=48, stop_at_eos=False, **sampling)
    uncached = model.generate(prompts, max_new_bytes=48, stop_at_eos=False, use_cache=False, **sampling)
    assert cached.ids == uncached.ids and cached.texts == uncached.texts


def test_use_cache_needs_a_blt():
    lm = torch.nn.Sequential(torch.nn.Embedding(260, 8), torch.nn.Linear(8, 260))
    with pytest.raises(ValueError, match="use_cache=True needs a ByteLatentTransformer, got Sequential"):
        generate(lm, "hi", max_new_bytes=2, use_cache=True)
