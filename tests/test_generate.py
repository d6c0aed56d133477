"""Generation: per-row state for batched prompts of different lengths, stopping, sampling, inputs."""

import pytest
import torch
from torch import nn

from blt_ext.model import EOS_ID, ByteLatentTransformer, ByteTokenizer, preset
from blt_ext.model.generate import encode_prompts, generate, sample_next

TOK = ByteTokenizer()
PROMPTS = ["Once upon a time", "BLT", "A much longer prompt about bytes, patches and entropy."]


def blt(device="cpu"):
    torch.manual_seed(0)
    model = ByteLatentTransformer(preset("blt-tiny"), backend="ext").to(device).eval()
    with torch.no_grad():
        model.entropy_model.lm_head.weight.mul_(6.0)
    return model


class CountingLM(nn.Module):
    """Predicts last + 1 for every byte, and EOS after the byte 10 (a known per-row stop point)."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, tokens):
        self.calls.append(tuple(tokens.shape))
        nxt = torch.where(tokens == 10, torch.full_like(tokens, EOS_ID), (tokens + 1).clamp_max(259))
        return torch.nn.functional.one_hot(nxt, 260).float() * 10 + self.anchor


def test_batched_prompts_of_different_lengths_match_single_runs(device):
    model = blt(device)
    batched = model.generate(PROMPTS, max_new_bytes=24, stop_at_eos=False)
    for i, prompt in enumerate(PROMPTS):
        single = model.generate(prompt, max_new_bytes=24, stop_at_eos=False)
        assert batched.ids[i] == single.ids[0], prompt
        assert batched.prompt_ids[i] == TOK.encode(prompt, add_eos=False)
    assert all(len(g) == 24 for g in batched.ids)


def test_identical_prompts_give_identical_greedy_outputs(device):
    out = blt(device).generate([PROMPTS[0]] * 4, max_new_bytes=32, stop_at_eos=False)
    assert all(ids == out.ids[0] for ids in out.ids) and len(set(out.texts)) == 1


def test_rows_stop_at_eos_independently():
    model = CountingLM()
    out = generate(model, [[1, 6], [1, 2, 3, 40]], max_new_bytes=8)
    assert out.ids == [[7, 8, 9, 10, EOS_ID], [41, 42, 43, 44, 45, 46, 47, 48]]
    assert out.texts == [bytes([3, 4, 5, 6]).decode(), bytes(range(37, 45)).decode()]
    # the finished row leaves the batch: after 5 steps only one row runs
    assert [shape[0] for shape in model.calls] == [2] * 5 + [1] * 3
    assert model.calls[0] == (2, 4) and model.calls[-1] == (1, 4 + 7)
    out = generate(CountingLM(), [[1, 6]], max_new_bytes=6, stop_at_eos=False)
    assert out.ids == [[7, 8, 9, 10, EOS_ID, 3]]


def test_sampling_is_seeded_and_degenerates_to_greedy():
    model = blt()
    greedy = model.generate(PROMPTS[:2], max_new_bytes=16, stop_at_eos=False)
    first = model.generate(PROMPTS[:2], max_new_bytes=16, temperature=1.0, seed=3, stop_at_eos=False)
    again = model.generate(PROMPTS[:2], max_new_bytes=16, temperature=1.0, seed=3, stop_at_eos=False)
    other = model.generate(PROMPTS[:2], max_new_bytes=16, temperature=1.0, seed=4, stop_at_eos=False)
    assert first.ids == again.ids and first.ids != other.ids and first.ids != greedy.ids
    top1 = model.generate(PROMPTS[:2], max_new_bytes=16, temperature=0.7, top_k=1, seed=5, stop_at_eos=False)
    nucleus = model.generate(PROMPTS[:2], max_new_bytes=16, temperature=0.7, top_p=1e-6, seed=5, stop_at_eos=False)
    assert top1.ids == greedy.ids and nucleus.ids == greedy.ids


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # nucleus 0.7: 0.5 < 0.7 so id 1 joins; 0.8 >= 0.7 closes the set
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3}
    assert sample_next(logits[:1], 0.0).tolist() == [0]


def test_prompt_forms():
    assert encode_prompts("Hi") == [[1, 76, 109]]
    assert encode_prompts(b"Hi") == [[1, 76, 109]]
    assert encode_prompts([1, 76]) == [[1, 76]]
    assert encode_prompts(torch.tensor([1, 76])) == [[1, 76]]
    assert encode_prompts(["Hi", [1, 5], torch.tensor([1])]) == [[1, 76, 109], [1, 5], [1]]
    with pytest.raises(ValueError, match="1-D"):
        encode_prompts(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="no prompts"):
        encode_prompts([])
    with pytest.raises(ValueError, match="at least one id"):
        encode_prompts([[]])


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_generation_runs_compiled_layers_eagerly(use_cache):
    from torch._dynamo.utils import counters

    model = blt()
    expected = model.generate(PROMPTS, max_new_bytes=10, stop_at_eos=False, use_cache=use_cache).ids
    model.compile_layers(dynamic=False)
    torch._dynamo.reset()  # no compiled code left from other tests
    frames = counters["frames"]["total"]
    # every step has new shapes: compiled, each would compile anew
    assert model.generate(PROMPTS, max_new_bytes=10, stop_at_eos=False, use_cache=use_cache).ids == expected
    assert counters["frames"]["total"] == frames
    with torch.no_grad():  # outside generation the compiled layers do run
        model(TOK.batch_encode(PROMPTS).ids)
    assert counters["frames"]["total"] > frames
