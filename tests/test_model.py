"""The BLT model: tokenizer, config, layers, entropy model, forward semantics, backends, loss."""

import dataclasses
import math

import pytest
import torch

from blt_ext.model import ByteLatentTransformer, ByteTokenizer, next_byte_loss, preset
from blt_ext.model.layers import TransformerBlock, document_ids, rope_angles, self_attention_mask
from blt_ext.nn import PatchCrossAttention, backend_ops

TOK = ByteTokenizer()


def tiny(**overrides):
    return dataclasses.replace(preset("blt-tiny"), **overrides)


def build(config=None, backend="torch", device="cpu", seed=0, patcher_scale=6.0):
    """A tiny random BLT whose entropy head is scaled so that patch lengths vary."""
    torch.manual_seed(seed)
    model = ByteLatentTransformer(config or tiny(), backend=backend).to(device)
    if model.entropy_model is not None:
        with torch.no_grad():
            model.entropy_model.lm_head.weight.mul_(patcher_scale)
    return model.eval()


def encode(text, device="cpu"):
    return torch.tensor([TOK.encode(text, add_eos=False)], device=device)


TEXT = "Byte Latent Transformer: patches scale better than tokens."


# ---- BLT forward ----------------------------------------------------------------------------


def test_forward_shapes_and_fp32_logits(device):
    model = build(device=device)
    tokens = encode(TEXT, device)
    logits = model(tokens)
    assert logits.shape == (1, tokens.shape[1], 260) and logits.dtype == torch.float32
    lengths = model.patch(tokens).patch_lengths
    assert lengths.sum().item() == tokens.shape[1] + 1 and lengths[0, 0].item() == 1
    assert (lengths > 1).any() and (lengths == 1).sum() > 1, "patch lengths should vary"
    model_bf16 = build(device=device).to(torch.bfloat16)
    assert model_bf16(tokens).dtype == torch.float32


def test_explicit_patch_lengths_reproduce_internal_patching(device):
    model = build(device=device)
    tokens = encode(TEXT, device)
    lengths = model.patch(tokens).patch_lengths
    torch.testing.assert_close(model(tokens, lengths), model(tokens), rtol=0, atol=0)
    # lengths summing to T (whole-document training layout) are accepted too
    as_t = lengths.clone()
    as_t[0, -1] -= 1
    assert model(tokens, as_t).shape == (1, tokens.shape[1], 260)


@pytest.mark.parametrize(
    "lengths, error, message",
    [
        ([[1, 2]], ValueError, "sum to T"),
        ([[2, 3, 1]], ValueError, "first patch"),
        ([[1, 0, 4, 1]], ValueError, "non-zero length after a zero"),
        ([[1, -1, 6]], ValueError, ">= 0"),
        ([[1.0, 5.0]], TypeError, "integer tensor"),
    ],
)
def test_bad_patch_lengths_are_refused(lengths, error, message):
    model = build()
    tokens = encode("hello")  # T = 6
    with pytest.raises(error, match=message):
        model(tokens, torch.tensor(lengths))


def test_bad_tokens_are_refused_by_name():
    model = build()
    tokens = encode("hello")
    with pytest.raises(ValueError, match=r"tokens are on meta but the model is on cpu; move them"):
        model(tokens.to("meta"))
    with pytest.raises(ValueError, match=r"ByteLatentTransformer.patch: tokens are on meta"):
        model.patch(tokens.to("meta"))
    with pytest.raises(ValueError, match=r"EntropyModel.forward: tokens are on meta"):
        model.entropy_model(tokens.to("meta"))
    with pytest.raises(TypeError, match=r"tokens must be an integer tensor, got torch.float32"):
        model(tokens.float())
    with pytest.raises(ValueError, match=r"tokens must be \[B, T\], got \(6,\)"):
        model(tokens[0])


def test_decoder_shift_byte_t_reads_patch_p_of_t_plus_1_minus_1():
    """BLT_SPEC.md f example: lengths [1, 3, 2, 1] over 6 bytes -> decoder patch ids [0,0,0,1,1,2]."""
    model = build()
    tokens = encode("Hello")
    lengths = torch.tensor([[1, 3, 2, 1]])
    base = model(tokens, lengths)
    first_changed = []
    for patch in range(4):
        handle = model.global_transformer.register_forward_hook(
            lambda mod, args, out, p=patch: out + torch.nn.functional.one_hot(torch.tensor(p), 4)[None, :, None] * 10.0
        )
        changed = (model(tokens, lengths) - base).abs().amax(-1)[0] > 0
        handle.remove()
        first_changed.append(int(changed.nonzero()[0]) if changed.any() else None)
    # patch 0 feeds bytes 0..2, patch 1 bytes 3..4, patch 2 byte 5, the last patch nothing
    assert first_changed == [0, 3, 5, None]


def test_logits_are_causal_under_entropy_patching():
    model = build()
    tokens = encode(TEXT)
    base = model(tokens)
    for t in (3, 20, tokens.shape[1] - 2):
        changed = tokens.clone()
        changed[0, t + 1 :] = torch.randint(4, 260, (tokens.shape[1] - t - 1,))
        torch.testing.assert_close(model(changed)[0, : t + 1], base[0, : t + 1], atol=1e-5, rtol=1e-5)


def test_rows_are_patched_independently_and_padding_is_invisible(device):
    model = build(device=device)
    texts = [TEXT, "short prompt", TEXT[::-1]]
    batch = TOK.batch_encode(texts, add_eos=False, device=device)
    logits = model(batch.ids)
    layout = model.patch(batch.ids)
    for b, text in enumerate(texts):
        single = encode(text, device)
        n = single.shape[1]
        torch.testing.assert_close(logits[b, :n], model(single)[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(layout.patch_ids[b, :n], model.patch(single).patch_ids[0])


def test_identical_rows_give_identical_patches_and_logits(device):
    model = build(device=device)
    tokens = encode(TEXT, device).repeat(4, 1)
    layout = model.patch(tokens)
    logits = model(tokens)
    for b in range(1, 4):
        assert torch.equal(layout.patch_lengths[b], layout.patch_lengths[0])
        assert torch.equal(logits[b], logits[0])


def test_empty_patches_give_exactly_zero_encoder_slots():
    model = build()
    tokens = encode("hello")  # T = 6
    mask = self_attention_mask(document_ids(tokens), 6, 512)
    # a zero-length padding patch, and a last patch holding only the virtual next byte
    for lengths, empty in (([[1, 5, 0]], 2), ([[1, 5, 1]], 2)):
        _, slots = model.local_encoder(tokens, torch.tensor(lengths), mask)
        k = model.config.cross_attn_k
        assert torch.equal(slots[0, empty * k : (empty + 1) * k], torch.zeros(k, slots.shape[-1]))
        assert slots[0, :k].abs().sum() > 0


def test_encoder_with_cross_attention_in_all_layers_pools_once():
    """BLT_SPEC.md k.4: the original pools after the first layer and carries the slots forward."""
    model = build(tiny(n_layers_local_encoder=2, cross_attn_all_layers_encoder=True))
    enc = model.local_encoder
    tokens = encode("pool once")
    lengths = torch.tensor([[1, 4, 5]])
    mask = self_attention_mask(document_ids(tokens), tokens.shape[1], 512)
    rope = rope_angles(torch.arange(tokens.shape[1]), enc.head_dim, enc.rope_theta)
    h = enc.layers[0](enc.embedding(tokens), rope, mask)
    slots = enc.patch_embedding_projection(enc.pooling(h, lengths)).view(1, 6, enc.dim)
    slots = slots + enc.cross_attn_layers[0](slots, h, lengths)
    h = enc.layers[1](h, rope, mask)
    slots = slots + enc.cross_attn_layers[1](slots, h, lengths)
    h_out, slots_out = enc(tokens, lengths, mask)
    torch.testing.assert_close(slots_out, slots, rtol=0, atol=0)
    torch.testing.assert_close(h_out, h, rtol=0, atol=0)


def test_global_block_causal_separates_documents_at_eos_patches():
    from blt_ext.model.blt import patch_document_ids

    tokens = torch.tensor([TOK.encode("first document") + TOK.encode("two", add_eos=False)])  # EOS at 15
    lengths = torch.tensor([[1, 5, 5, 5, 3, 2]])  # patch 3 = bytes 11..15 holds the EOS
    assert patch_document_ids(tokens, lengths).tolist() == [[0, 0, 0, 0, 1, 1]]
    model = build(tiny(global_block_causal=True))
    seen = {}
    handle = model.global_transformer.register_forward_hook(lambda m, args, out: seen.update(doc_ids=args[1]))
    model(tokens, lengths)
    handle.remove()
    assert seen["doc_ids"].tolist() == [[0, 0, 0, 0, 1, 1]]
    glob = model.global_transformer
    x = torch.randn(1, 6, model.config.global_input_dim)
    base = glob(x, seen["doc_ids"], "sdpa")
    x[0, 1] += 1.0
    out = glob(x, seen["doc_ids"], "sdpa")
    torch.testing.assert_close(out[0, 4:], base[0, 4:], rtol=0, atol=0)  # the next document
    assert not torch.allclose(out[0, 1:4], base[0, 1:4])


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
def test_forward_with_explicit_patches_compiles_to_one_graph(device):
    model = build(device=device)
    tokens = encode(TEXT, device)
    lengths = model.patch(tokens).patch_lengths
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # graph capture, no codegen
    # RoPE rotates with complex products in eager and with real ones when compiled: fp32 rounding apart
    torch.testing.assert_close(compiled(tokens, lengths), model(tokens, lengths), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@torch.no_grad()  # flex_attention has no CPU backward
def test_flex_attention_gives_the_sdpa_logits(device):
    # compiled flex_attention needs head_dim >= 16
    entropy = dataclasses.replace(preset("blt-entropy-tiny"), n_heads=2)
    config = tiny(global_block_causal=True, n_heads_local_encoder=2, n_heads_local_decoder=2, entropy_model=entropy)
    model = build(config, device=device)
    tokens = torch.tensor([TOK.encode("two documents") + TOK.encode("in one row", add_eos=False)], device=device)
    expected = model(tokens)
    model.attn_impl = "flex"
    assert model.entropy_model.attn_impl == "flex"
    torch.testing.assert_close(model(tokens), expected, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        model.attn_impl = "xformers"


# ---- backends -------------------------------------------------------------------------------


def loss_and_grads(model, batch, lengths):
    """(loss, {parameter name: gradient}) of one next-byte loss on ``batch`` with ``lengths``."""
    model.zero_grad()
    loss = model.loss(batch.ids, batch.mask, lengths).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(got, expected):
    (loss, grads), (expected_loss, expected_grads) = got, expected
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_backends_give_the_same_logits_and_gradients(device):
    model = build(backend="ext", device=device)
    batch = TOK.batch_encode([TEXT, "a shorter row"], device=device)
    lengths = model.patch(batch.ids[:, :-1]).patch_lengths
    results = {}
    for backend in ("ext", "torch"):
        model.backend = backend
        assert all(m.backend == backend for m in model.modules() if hasattr(m, "_backend"))
        results[backend] = loss_and_grads(model, batch, lengths)
    assert_same_loss_and_grads(results["ext"], results["torch"])
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "cuda"


def test_compiled_layers_give_the_eager_loss_and_gradients(device):
    model = build(backend="ext", device=device)
    batch = TOK.batch_encode([TEXT, "a shorter row"], device=device)
    lengths = model.patch(batch.ids[:, :-1]).patch_lengths
    names = list(model.state_dict())
    layers = [m for m in model.modules() if isinstance(m, (TransformerBlock, PatchCrossAttention))]
    eager = loss_and_grads(model, batch, lengths)
    assert model.compile_layers(dynamic=False) is model
    assert layers and all("forward" in vars(m) for m in layers)
    assert_same_loss_and_grads(loss_and_grads(model, batch, lengths), eager)
    assert list(model.state_dict()) == names  # checkpoints keep their keys
    model.compile_layers(False)
    assert not any("forward" in vars(m) for m in layers)


def test_backend_names_resolve_to_op_namespaces():
    import blt_ext

    assert backend_ops("ext") is blt_ext.ops and backend_ops("torch") is blt_ext.reference


# ---- loss and training ----------------------------------------------------------------------


def test_next_byte_loss_masks_padding_and_reports_bits_per_byte():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 260), torch.randint(0, 260, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    out = next_byte_loss(logits, targets, mask)
    nll = torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")
    torch.testing.assert_close(out.nll_sum, nll)
    assert out.num_bytes.item() == 7
    torch.testing.assert_close(out.loss, nll / 7)
    torch.testing.assert_close(out.bits_per_byte, nll / 7 / math.log(2))
    assert next_byte_loss(logits, targets, torch.zeros_like(mask)).loss.item() == 0.0


def test_training_step_updates_every_blt_parameter_but_not_the_entropy_model():
    model = build().train()
    batch = TOK.batch_encode([TEXT, "short"])
    model.loss(batch.ids, batch.mask).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("patcher."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---- patching modes -------------------------------------------------------------------------


def _trim(lengths):
    return lengths[:, : int((lengths > 0).sum(1).max())]


def _split(raw, m):
    return [piece for r in raw for piece in [m] * (r // m) + [r % m] * (r % m > 0)]


@pytest.mark.parametrize("mode", ["space", "static", "byte", "entropy"])
def test_patching_modes_and_max_patch_length(mode):
    model = build(tiny(patching_mode=mode, patch_size=4, max_patch_length=3))
    ops = backend_ops("torch")
    tokens = encode("split me, into patches; please!")
    n = tokens.shape[1]
    lengths = model.patch(tokens).patch_lengths
    assert lengths.sum().item() == n + 1 and lengths[0, 0].item() == 1 and lengths.max().item() <= 3
    if mode == "space":
        expected = ops.patch_layout(ops.space_patch_starts(tokens), max_patch_length=3).patch_lengths
    elif mode == "static":  # patches of 4 from the start, after a forced first one-byte patch
        starts = [0, 1] + list(range(4, n + 1, 4))
        expected = torch.tensor([_split([b - a for a, b in zip(starts, starts[1:] + [n + 1])], 3)])
    elif mode == "byte":
        expected = torch.ones(1, n + 1, dtype=torch.long)
    else:
        expected = ops.entropy_patch(model.entropy_model(tokens), max_patch_length=3).patch_lengths
    assert lengths.tolist() == _trim(expected).tolist()
    assert model(tokens).shape == (1, n, 260)


def test_init_follows_the_original_truncated_normals():
    model = build()
    emb = model.local_encoder.embedding.hash_weight
    std = 32**-0.5
    assert emb.abs().max() <= 3 * std + 1e-6
    assert emb.std().item() == pytest.approx(std * 0.9866, rel=0.05)  # ±3σ truncation: σ x 0.9866
    down = model.global_transformer.layers[0].mlp.down_proj.weight
    assert down.std().item() == pytest.approx(down.shape[1] ** -0.5 * 0.9866, rel=0.05)
    assert torch.equal(model.local_decoder.norm.weight, torch.ones(32))
