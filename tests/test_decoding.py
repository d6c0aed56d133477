"""KV-cached decoding against the full forward: logits at every step, patches, and generation."""

import dataclasses

import pytest
import torch

from blt_ext.model import ByteLatentTransformer, ByteTokenizer, preset
from blt_ext.model.decoding import RowDecoder
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
    "windows bind": {"local_attention_window_len": 7, "entropy_window": 5},
    "cross-attention in all layers": {"cross_attn_all_layers_encoder": True, "cross_attn_all_layers_decoder": True,
                                      "n_layers_local_encoder": 2},
    "max patch length 3, monotonic": {"max_patch_length": 3, "monotonicity": True, "patching_threshold": 0.1},
    "space patching": {"patching_mode": "space"},
    "byte patching": {"patching_mode": "byte"},
    "static patching": {"patching_mode": "static", "patch_size": 3},
}


@pytest.mark.parametrize("changes", CONFIGS.values(), ids=CONFIGS.keys())
def test_logits_equal_the_full_forward_at_every_step(device, changes):
    model = blt(device, **changes)
    # an EOS inside the prompt: documents split the local masks and the global block-causal mask
    prompt = TOK.encode("a first document", add_eos=True) + TOK.encode(PROMPT, add_eos=False)
    g = torch.Generator().manual_seed(0)
    continuation = torch.randint(4, 260, (40,), generator=g).tolist()
    decoder = RowDecoder(model)
    with torch.inference_mode():
        got = decoder.extend(torch.tensor(prompt, device=device))
        want = model(torch.tensor([prompt], device=device))[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        tokens = list(prompt)
        for byte in continuation:
            tokens.append(byte)
            got = decoder.extend(torch.tensor([byte], device=device))
            want = model(torch.tensor([tokens], device=device))[0, -1]
            torch.testing.assert_close(got[-1], want, atol=1e-4, rtol=1e-4)
        full = model.patch(torch.tensor([tokens], device=device)).patch_lengths
    # the global transformer ran once per complete patch: all but the last (virtual byte) patch
    assert decoder.patch_outputs.length == full.shape[1] - 1
    if changes.get("patching_mode") is None:
        assert 1 < full.shape[1] < len(tokens)  # patches of several bytes: the entropies mattered


def test_several_bytes_after_the_prompt_are_taken_one_by_one(device):
    model = blt(device)
    ids = torch.tensor(TOK.encode(PROMPT, add_eos=False), device=device)
    with torch.inference_mode():
        whole = RowDecoder(model).extend(ids)
        parts = RowDecoder(model)
        first = parts.extend(ids[:5])
        rest = parts.extend(ids[5:])
    torch.testing.assert_close(torch.cat([first, rest]), whole, atol=1e-4, rtol=1e-4)


def test_bad_new_ids_are_refused(device):
    decoder = RowDecoder(blt(device))
    with pytest.raises(ValueError, match=r"new_ids must be 1-D and non-empty, got shape \(0,\)"):
        decoder.extend(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"got shape \(1, 2\)"):
        decoder.extend(torch.tensor([[1, 2]]))


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 20, "seed": 3}], ids=["greedy", "sampled"])
def test_cached_generation_gives_the_uncached_outputs(device, sampling):
    model = blt(device)
    prompts = ["Once upon a time", "BLT", "A much longer prompt about bytes, patches and entropy."]
    cached = model.generate(prompts, max_new_bytes=48, stop_at_eos=False, **sampling)
    uncached = model.generate(prompts, max_new_bytes=48, stop_at_eos=False, use_cache=False, **sampling)
    assert cached.ids == uncached.ids and cached.texts == uncached.texts


def test_use_cache_needs_a_blt():
    lm = torch.nn.Sequential(torch.nn.Embedding(260, 8), torch.nn.Linear(8, 260))
    with pytest.raises(ValueError, match="use_cache=True needs a ByteLatentTransformer, got Sequential"):
        generate(lm, "hi", max_new_bytes=2, use_cache=True)
