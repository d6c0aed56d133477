"""The whole BLT model, forward and forward + backward: ours with the ext ops, ours with the
pure-PyTorch twins (backend "torch", the same module with its op switch flipped, so the same
weights), and ``transformers.BltForCausalLM`` loaded with those weights.

CUDA: preset ``blt-1b`` (random weights), bf16, B=1, T=8192 bytes. CPU: ``blt-tiny``, fp32, B=1,
T=512. Every side gets the same explicit patch lengths (mean 4.5 bytes, first patch one byte), so
no entropy model runs and the timings compare the byte/patch model alone.

``extra_info`` carries ``bytes_per_s`` (input bytes per second at the median time) and, on CUDA,
``peak_mem_mb``: the step's peak allocation above what was resident before it (the weights of
both models stay resident through the run, so the absolute peak would not tell providers apart);
``resident_mb`` is that baseline.

Before anything is timed, the fixture checks that the three providers produce the same logits
(fp32: to the parity tests' 1e-4; bf16: relative norm of the difference <= BLT_BENCH_MODEL_RTOL,
default 0.05), so that no wrong model is ever timed.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from common import DEVICE, ON_CUDA, run_benchmark

from blt_ext.model import ByteLatentTransformer, preset
from blt_ext.model.checkpoint import config_to_transformers, state_dict_to_transformers
from blt_ext.model.tokenizer import OFFSET, VOCAB_SIZE
from blt_ext.testing import random_patch_lengths

if ON_CUDA:
    PRESET, DTYPE, BATCH, SEQ = "blt-1b", torch.bfloat16, 1, 8192
else:
    PRESET, DTYPE, BATCH, SEQ = "blt-tiny", torch.float32, 1, 512
PROVIDERS = ("ext", "torch", "transformers")
DTYPE_NAME = {torch.bfloat16: "bf16", torch.float32: "fp32"}[DTYPE]


def transformers_patch_lengths(patch_lengths):
    """Our lengths (rows summing to T + 1: the last patch also holds the virtual next byte) as the
    transformers port's patcher produces them: rows summing to T, the last non-zero patch one byte
    shorter (0 when it held only the virtual byte), same patch count. BltModel.forward takes
    ``patch_lengths`` [B, P] as given (BltForCausalLM passes it through ``**kwargs``) and only
    turns them into patch start offsets, so both forms put every real byte in the same patch; this
    is the pairing tests/test_model_parity.py verifies against the port's own patcher.
    """
    last = (patch_lengths > 0).sum(1, keepdim=True) - 1
    return patch_lengths.scatter_add(1, last, torch.full_like(last, -1))


def build_models(preset_name=PRESET, dtype=DTYPE, device=DEVICE, seed=0):
    """(ours, hf): ours with random weights (the original's init), hf holding the same tensors' values.

    Built directly on ``device`` so that the 1B model's ~4.5e9 parameters (3.07e9 in the six hash
    tables) are initialised there, not on the host. transformers >= 5.24 applies the 512-byte
    local window (as we do); an older version applies none, so ours is set to match it.
    """
    from transformers import BltConfig, BltForCausalLM

    from blt_ext.testing.model import HF_LOCAL_WINDOW

    config = preset(preset_name)
    config.local_attention_window_len = HF_LOCAL_WINDOW
    torch.manual_seed(seed)
    with torch.device(device):
        ours = ByteLatentTransformer(config, backend="ext").to(dtype).eval()
        hf = BltForCausalLM(BltConfig(**config_to_transformers(config, dtype))).to(dtype).eval()
    missing, unexpected = hf.load_state_dict(state_dict_to_transformers(ours), strict=False)
    # transformers keeps RoPE inverse frequencies as buffers; they are derived, not weights.
    assert not unexpected and all(k.endswith("inv_freq") for k in missing), (missing, unexpected)
    for model in (ours, hf):
        # The entropy model is frozen in both; it does not run with explicit patch lengths.
        for name, p in model.named_parameters():
            p.requires_grad_("patcher" not in name)
    return ours, hf


def model_inputs(batch=BATCH, seq=SEQ, device=DEVICE, seed=0):
    """(inputs [B, T], targets [B, T], our patch lengths (sum T + 1), transformers' (sum T)).

    Bytes are drawn from the 256 byte ids only: an EOS would split documents in ours (the
    original's semantics) but not in the port (BLT_SPEC.md k.2), and the logits would differ.
    """
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(OFFSET, VOCAB_SIZE, (batch, seq + 1), generator=g)
    lengths = random_patch_lengths(batch, seq, mean_length=4.5, include_next_token=True, generator=g)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    to = [t.to(device) for t in (inputs, targets, lengths, transformers_patch_lengths(lengths))]
    return tuple(to)


def make_forward(provider, ours, hf):
    """logits(inputs, our lengths, transformers' lengths) of a provider (fp32 [B, T, V]).

    Sets our model's op backend now (once, outside the timed calls): use the returned function
    before making another provider's.
    """
    if provider == "transformers":
        return lambda x, pl, hf_pl: hf(x, patch_lengths=hf_pl, use_cache=False).logits
    ours.backend = provider
    return lambda x, pl, hf_pl: ours(x, pl)


def check_agreement(logits, dtype=DTYPE):
    """Every provider's logits against transformers': tight in fp32, relative norm in bf16."""
    expected = logits["transformers"].float()
    for provider, actual in logits.items():
        if dtype == torch.float32:
            torch.testing.assert_close(actual.float(), expected, atol=1e-4, rtol=0, msg=lambda m: f"{provider}: {m}")
        else:
            rtol = float(os.environ.get("BLT_BENCH_MODEL_RTOL", "0.05"))
            rel = ((actual.float() - expected).norm() / expected.norm()).item()
            assert rel <= rtol, f"{provider} logits differ from transformers': relative norm {rel:.3g} > {rtol}"


@pytest.fixture(scope="module")
def setup():
    ours, hf = build_models()
    inputs = model_inputs()
    with torch.no_grad():
        check_agreement({p: make_forward(p, ours, hf)(inputs[0], *inputs[2:]) for p in PROVIDERS})
    yield ours, hf, inputs
    ours.backend = "ext"


def step(forward, models, x, targets, pl, hf_pl):
    """One training step's compute: forward, next-byte cross-entropy, backward (fresh grads)."""
    for model in models:
        model.zero_grad(set_to_none=True)
    logits = forward(x, pl, hf_pl)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_model(benchmark, setup, backward, provider):
    ours, hf, (x, targets, pl, hf_pl) = setup
    forward = make_forward(provider, ours, hf)
    model = hf if provider == "transformers" else ours
    if backward:

        def fn():
            step(forward, (model,), x, targets, pl, hf_pl)
    else:

        def fn():
            with torch.no_grad():
                return forward(x, pl, hf_pl)

    if ON_CUDA:
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    direction = "fwd+bwd" if backward else "fwd"
    run_benchmark(
        benchmark,
        fn,
        provider=provider,
        group=f"model {PRESET} {direction} B{BATCH} T{SEQ} {DTYPE_NAME}",
        bytes_moved=None,
    )
    median_ms = benchmark.extra_info.get("median_ms") or benchmark.stats.stats.median * 1e3
    benchmark.extra_info["bytes_per_s"] = BATCH * SEQ / (median_ms / 1e3)
    benchmark.extra_info["patches"] = int((pl > 0).sum())
    if provider == "transformers":
        benchmark.extra_info["attn_implementation"] = hf.config._attn_implementation
    if ON_CUDA:
        benchmark.extra_info["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - resident) / 2**20
        benchmark.extra_info["resident_mb"] = resident / 2**20
    model.zero_grad(set_to_none=True)  # the next provider starts from the same resident memory
