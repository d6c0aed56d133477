"""patch_cross_attention (both directions) against the dense-mask reference and a per-row loop."""

import math

import pytest
import torch

from blt_ext import ops, reference
from blt_ext.reference.patch_attention import (
    cross_attention_mask,
    decoder_patch_ids,
    encoder_patch_ids,
    masked_attention,
)
from blt_ext.testing import (
    PATCH_LAYOUTS,
    assert_close_to_reference,
    one_byte_patches_with_gaps,
    random_patch_lengths,
)
from blt_ext.testing.patch_attention import attention_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DIRECTIONS = ["encoder", "decoder"]
# (heads, head_dim) cycled over the layouts of a case, so every pair meets every layout somewhere.
HEAD_SHAPES = [(4, 64), (1, 16), (2, 40), (1, 256), (3, 20)]


def run_ext(q, k, v, lengths, slots, direction, scale, grad_out):
    """(out, lse, (dq, dk, dv)) of the op, gradients through its registered autograd."""
    out, lse = torch.ops.blt_ext.patch_cross_attention(q, k, v, lengths, slots, direction, scale)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, lse, grads


def run_reference(q, k, v, lengths, slots, direction, scale, grad_out):
    """The same in float64 on the CPU, from the same (already rounded) inputs."""
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    num_bytes = k.shape[1] if direction == "encoder" else q.shape[1]
    mask = cross_attention_mask(lengths.cpu(), num_bytes, slots, direction)
    out, lse = masked_attention(q64, k64, v64, mask, scale)
    grads = torch.autograd.grad(out, (q64, k64, v64), grad_out.cpu().double())
    return out, lse, grads


def labelled(label):
    return lambda message: f"{label}: {message}"


def assert_matches_reference(q, k, v, lengths, slots, direction, generator, scale=None, grad_tolerance=2):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    grad_out = torch.randn(q.shape, generator=generator).to(q.device, q.dtype)
    out, lse, grads = run_ext(q, k, v, lengths, slots, direction, scale, grad_out)
    out64, lse64, grads64 = run_reference(q, k, v, lengths, slots, direction, scale, grad_out)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_close_to_reference(out, out64, q.dtype, msg=labelled(f"{direction} out"))
    # lse is accumulated (and stored) in float32 whatever the input dtype.
    assert_close_to_reference(lse, lse64, lse.dtype, scale=10, msg=labelled(f"{direction} lse"))
    # Gradients sum many rounded terms, and the backward reads the rounded output O.
    for name, grad, grad64 in zip("qkv", grads, grads64):
        assert_close_to_reference(
            grad, grad64, q.dtype, scale=grad_tolerance, msg=labelled(f"{direction} d{name}")
        )


@pytest.mark.parametrize("slots", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_matches_reference(device, generator, direction, dtype, slots):
    for i, layout in enumerate(PATCH_LAYOUTS):
        heads, head_dim = HEAD_SHAPES[(i + slots) % len(HEAD_SHAPES)]
        q, k, v, lengths = attention_inputs(
            2, 45, heads, head_dim, slots, direction, layout=layout,
            include_next_token=i % 2 == 0, extra_patches=i % 3, dtype=dtype, device=device,
            generator=generator, requires_grad=True,
        )
        assert_matches_reference(q, k, v, lengths, slots, direction, generator)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_long_patch(device, generator, direction):
    """One patch of 2000+ bytes: longer than any tile or chunk of the kernels."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, lengths = attention_inputs(
            2, 2100, 2, 64, 2, direction, layout="long_patch", dtype=dtype, device=device,
            generator=generator, requires_grad=True,
        )
        assert lengths.max() > 2000
        assert_matches_reference(q, k, v, lengths, 2, direction, generator)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_many_slots(device, generator, direction):
    """More slots than a kernel holds at once (the CUDA kernels take them in chunks)."""
    for dtype, slots in ((torch.float32, 6), (torch.bfloat16, 9), (torch.float64, 5)):
        q, k, v, lengths = attention_inputs(
            2, 60, 2, 32, slots, direction, layout="random", extra_patches=1, dtype=dtype,
            device=device, generator=generator, requires_grad=True,
        )
        assert_matches_reference(q, k, v, lengths, slots, direction, generator)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_head_groups(device, generator, direction):
    """Many narrow heads side by side (the CUDA kernels pack a warp with heads, then split bytes)
    and a head count that leaves the last group of heads partial."""
    for heads, head_dim, dtype in ((16, 8, torch.bfloat16), (5, 64, torch.float32), (16, 64, torch.float16)):
        q, k, v, lengths = attention_inputs(
            2, 50, heads, head_dim, 2, direction, dtype=dtype, device=device,
            generator=generator, requires_grad=True,
        )
        assert_matches_reference(q, k, v, lengths, 2, direction, generator)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_unaligned_storage(device, generator, direction):
    """Contiguous views that start one element into their storage (no 16-byte vector loads)."""
    for head_dim in (64, 20):
        q, k, v, lengths = attention_inputs(
            2, 40, 2, head_dim, 2, direction, dtype=torch.float16, device=device,
            generator=generator,
        )

        def shifted(x):
            flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
            view = flat[1:].view(x.shape)
            view.copy_(x)
            return view.requires_grad_()

        q, k, v = shifted(q), shifted(k), shifted(v)
        assert q.is_contiguous() and q.data_ptr() % 16 != 0
        assert_matches_reference(q, k, v, lengths, 2, direction, generator)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_large_random(device, generator, direction):
    """Many patches and all 16 heads; larger on a GPU, where it covers many thread blocks."""
    num_bytes = 2000 if device.type == "cuda" else 300
    q, k, v, lengths = attention_inputs(
        2, num_bytes, 16, 64, 2, direction, dtype=torch.bfloat16, device=device,
        generator=generator, requires_grad=True,
    )
    # Thousands of bf16 rows: the few largest deviations of the gradients, which take D = dO . O
    # from the stored bf16 output O (as flash attention does) where the reference has the exact
    # O, reach past twice the bf16 tolerance (19 of 1.9M encoder dq elements on the H200). A
    # float64 model of just that rounding, on three draws of this case, gives the same picture:
    # max |error| 0.050-0.053, 13-17 elements past twice the tolerance, none past four times.
    assert_matches_reference(q, k, v, lengths, 2, direction, generator, scale=0.3, grad_tolerance=4)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_thousands_of_patches(device, generator, direction):
    """Over 4,096 patches per row: the CUDA ends' scan runs several 2,048-patch tiles, with
    zero-length patches on and beside the tile boundaries."""
    num_bytes = 4200
    lengths = one_byte_patches_with_gaps(1, num_bytes, [700, 2047, 2048, 4096])
    q, k, v, lengths = attention_inputs(
        1, num_bytes, 1, 8, 1, direction, patch_lengths=lengths, device=device,
        generator=generator, requires_grad=True,
    )
    assert_matches_reference(q, k, v, lengths, 1, direction, generator)


def explicit_attention(q, k, v, lengths, slots, direction, scale):
    """Per-row attention following BLT_SPEC.md d/f literally, in float64, no masks."""
    q, k, v = (x.detach().cpu().double() for x in (q, k, v))
    out = torch.zeros_like(q)

    def attend(query, keys, values):  # query [H, Dh], keys/values [n, H, Dh]
        probs = torch.softmax(torch.einsum("hd,nhd->hn", query, keys) * scale, dim=-1)
        return torch.einsum("hn,nhd->hd", probs, values)

    for b, row in enumerate(lengths.tolist()):
        ends = [sum(row[: p + 1]) for p in range(len(row))]
        if direction == "encoder":
            num_bytes = k.shape[1]
            for p, (length, end) in enumerate(zip(row, ends)):
                byte_range = range(end - length, min(end, num_bytes))
                for j in range(p * slots, (p + 1) * slots):
                    if len(byte_range):
                        out[b, j] = attend(q[b, j], k[b, byte_range], v[b, byte_range])
        else:
            for t in range(q.shape[1]):
                # the latest (non-empty) patch that ends at or before t + 1
                ready = [p for p, (n, end) in enumerate(zip(row, ends)) if n and end <= t + 1]
                if ready:
                    rows = slice(ready[-1] * slots, (ready[-1] + 1) * slots)
                    out[b, t] = attend(q[b, t], k[b, rows], v[b, rows])
    return out


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_matches_explicit_loop(device, generator, direction):
    rows = torch.tensor(
        [
            [1, 3, 2, 1, 0, 0],  # BLT_SPEC.md f worked example (sums to T + 1), zero padding
            [3, 2, 0, 1, 0, 0],  # first patch longer than 1, an interior empty patch, sums to T
        ]
    )
    for lengths in (rows, None):
        q, k, v, lengths = attention_inputs(
            2, 6 if lengths is not None else 40, 3, 8, 2, direction, patch_lengths=lengths,
            dtype=torch.float64, device=device, generator=generator,
        )
        scale = 0.5
        out = ops.patch_cross_attention(q, k, v, lengths, 2, direction, scale)
        expected = explicit_attention(q, k, v, lengths, 2, direction, scale)
        torch.testing.assert_close(out.cpu(), expected)
        expected = reference.patch_cross_attention(
            q.cpu(), k.cpu(), v.cpu(), lengths.cpu(), 2, direction, scale
        )
        torch.testing.assert_close(out.cpu(), expected)


def test_patch_ids_worked_example():
    """BLT_SPEC.md f: lengths [1, 3, 2, 1] over 6 bytes give encoder ids [0, 1, 1, 1, 2, 2]
    and decoder ids [0, 0, 0, 1, 1, 2]."""
    lengths = torch.tensor([[1, 3, 2, 1, 0]])
    assert encoder_patch_ids(lengths, 6).tolist() == [[0, 1, 1, 1, 2, 2]]
    assert decoder_patch_ids(lengths, 6).tolist() == [[0, 0, 0, 1, 1, 2]]
    assert decoder_patch_ids(torch.tensor([[3, 2, 1]]), 5).tolist() == [[-1, -1, 0, 0, 1]]


def test_encoder_empty_patches_give_zero(device, generator):
    """Zero-length padding patches and a final patch holding only the virtual next byte see no
    byte: their query rows are exactly 0 with lse -inf, and get no gradient."""
    # row 0 sums to T + 1, its last patch holds only the virtual byte; row 1 sums to T
    lengths = torch.tensor([[1, 4, 2, 1, 0, 0], [1, 2, 4, 0, 0, 0]])
    q, k, v, lengths = attention_inputs(
        2, 7, 2, 16, 2, "encoder", patch_lengths=lengths, device=device, generator=generator,
        requires_grad=True,
    )
    out, lse = torch.ops.blt_ext.patch_cross_attention(q, k, v, lengths, 2, "encoder", 0.25)
    empty = torch.tensor([[3, 4, 5], [3, 4, 5]])  # patches without a real byte
    for b, patches in enumerate(empty.tolist()):
        rows = [p * 2 + r for p in patches for r in range(2)]
        assert torch.equal(out[b, rows], torch.zeros_like(out[b, rows]))
        assert torch.isneginf(lse[b][:, rows]).all()
        assert torch.isfinite(lse[b][:, [r for r in range(12) if r not in rows]]).all()
    (dq,) = torch.autograd.grad(out, q, torch.ones_like(out))
    assert torch.equal(dq[0, 6:], torch.zeros_like(dq[0, 6:]))


def test_decoder_bytes_before_first_patch_give_zero(device, generator):
    """With a first patch of 3 bytes, bytes 0 and 1 see no completed patch: out 0, lse -inf,
    dq 0; byte 2 sees patch 0 (and no key of patch 2, whose end is never reached)."""
    lengths = torch.tensor([[3, 2, 2]])
    q, k, v, lengths = attention_inputs(
        1, 6, 2, 16, 2, "decoder", patch_lengths=lengths, device=device, generator=generator,
        requires_grad=True,
    )
    out, lse = torch.ops.blt_ext.patch_cross_attention(q, k, v, lengths, 2, "decoder", 0.25)
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
    assert torch.isneginf(lse[0, :, :2]).all() and torch.isfinite(lse[0, :, 2:]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(dq[0, :2], torch.zeros_like(dq[0, :2]))
    assert torch.equal(dk[0, 4:], torch.zeros_like(dk[0, 4:]))  # the last patch is never read
    assert torch.equal(dv[0, 4:], torch.zeros_like(dv[0, 4:]))
    assert dk[0, :4].abs().sum() > 0


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_backward_is_deterministic(device, generator, direction):
    q, k, v, lengths = attention_inputs(
        2, 200, 4, 32, 2, direction, dtype=torch.float32, device=device, generator=generator,
        requires_grad=True,
    )
    out = ops.patch_cross_attention(q, k, v, lengths, 2, direction)
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradcheck(device, generator, direction):
    q, k, v, lengths = attention_inputs(
        2, 9, 2, 4, 2, direction, extra_patches=1, dtype=torch.float64, device=device,
        generator=generator, requires_grad=True,
    )
    assert torch.autograd.gradcheck(
        lambda q, k, v: ops.patch_cross_attention(q, k, v, lengths, 2, direction), (q, k, v)
    )


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_opcheck(device, generator, direction):
    q, k, v, lengths = attention_inputs(
        2, 11, 2, 8, 2, direction, extra_patches=1, device=device, generator=generator,
        requires_grad=True,
    )
    ends = torch.ops.blt_ext.patch_ends(lengths)
    torch.library.opcheck(torch.ops.blt_ext.patch_ends.default, (lengths,))
    for given_ends in (None, ends):
        args = (q, k, v, lengths, 2, direction, 0.3, given_ends)
        torch.library.opcheck(torch.ops.blt_ext.patch_cross_attention.default, args)
        out, lse = torch.ops.blt_ext.patch_cross_attention(*args)
        backward_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse,
                         lengths, 2, direction, 0.3, given_ends)
        torch.library.opcheck(torch.ops.blt_ext.patch_cross_attention_backward.default, backward_args)


@pytest.mark.parametrize("layout", PATCH_LAYOUTS)
def test_patch_ends(device, generator, layout):
    """The op both attention ops walk: the running sum of the lengths along P, every row alone."""
    lengths = random_patch_lengths(3, 700, layout=layout, generator=generator)
    # zero-length padding, and more than one scan tile (2,048 lengths) a row
    lengths = torch.cat([lengths, torch.zeros(3, 2500 - lengths.shape[1], dtype=torch.long)], 1)
    expected = torch.cumsum(lengths, 1)
    assert torch.equal(torch.ops.blt_ext.patch_ends(lengths.to(device)).cpu(), expected)
    columns = lengths.t().contiguous().to(device).t()  # a strided view: the op reads it as given
    assert torch.equal(torch.ops.blt_ext.patch_ends(columns).cpu(), expected)
    assert torch.ops.blt_ext.patch_ends(lengths[:0].to(device)).shape == (0, 2500)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_given_patch_ends(device, generator, direction):
    """Ends passed in (once for the forward and its backward) give bitwise the same results."""
    q, k, v, lengths = attention_inputs(
        2, 300, 4, 64, 2, direction, extra_patches=2, dtype=torch.bfloat16, device=device,
        generator=generator,
    )
    ends = torch.ops.blt_ext.patch_ends(lengths)
    results = []
    for given_ends in (None, ends):
        out, lse = torch.ops.blt_ext.patch_cross_attention(q, k, v, lengths, 2, direction, 0.125, given_ends)
        grads = torch.ops.blt_ext.patch_cross_attention_backward(
            torch.ones_like(out), q, k, v, out, lse, lengths, 2, direction, 0.125, given_ends
        )
        results.append((out, lse, *grads))
    for without, given in zip(*results):
        assert torch.equal(without, given)


def test_given_patch_ends_errors(device):
    q, k, v, lengths, slots, direction, scale = good_args(device)
    out, lse = torch.ops.blt_ext.patch_cross_attention(q, k, v, lengths, slots, direction, scale)
    ends = torch.cumsum(lengths, 1)

    def both_ops(bad_ends):  # the forward and the backward op check the same way
        yield lambda: torch.ops.blt_ext.patch_cross_attention(q, k, v, lengths, slots, direction, scale, bad_ends)
        yield lambda: torch.ops.blt_ext.patch_cross_attention_backward(
            torch.ones_like(out), q, k, v, out, lse, lengths, slots, direction, scale, bad_ends
        )

    cases = [
        (ends.int(), TypeError, r"patch_ends must have dtype Long, got Int"),
        (ends[:, 1:], ValueError, r"patch_ends must have the shape of patch_lengths \[1, \d+\], got \[1, \d+\]"),
    ]
    if device.type == "cpu":  # the values are compared on the CPU only (no host sync on CUDA)
        cases.append((ends - 1, ValueError, r"patch_ends must be the running sum of patch_lengths along P"))
    else:
        cases.append((ends.cpu(), ValueError, r"patch_lengths and patch_ends must be on the same device"))
    for bad_ends, error, rule in cases:
        for op in both_ops(bad_ends):
            with pytest.raises(error, match=rule):
                op()
    with pytest.raises(ValueError, match=r"blt_ext.patch_ends: patch_lengths must be a 2-D tensor \[B, P\]"):
        torch.ops.blt_ext.patch_ends(lengths[0])
    with pytest.raises(TypeError, match=r"blt_ext.patch_ends: patch_lengths must have dtype Long, got Int"):
        torch.ops.blt_ext.patch_ends(lengths.int())


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_compile_matches_eager(device, generator, direction):
    torch._dynamo.reset()

    def forward(q, k, v, lengths):
        return ops.patch_cross_attention(q, k, v, lengths, 2, direction) * 2

    def step(fn, q, k, v, lengths):  # AOTAutograd compiles the backward with the forward
        out = fn(q, k, v, lengths)
        return out, torch.autograd.grad((out * out).sum(), (q, k, v))

    compiled = torch.compile(forward, fullgraph=True, dynamic=True)
    for num_bytes in (20, 33):
        q, k, v, lengths = attention_inputs(
            2, num_bytes, 2, 16, 2, direction, device=device, generator=generator,
            requires_grad=True,
        )
        eager_out, eager_grads = step(forward, q, k, v, lengths)
        out, grads = step(compiled, q, k, v, lengths)
        torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
        for a, b in zip(grads, eager_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reference_has_no_nan_for_empty_rows(generator):
    """The reference gives 0 (not NaN) for fully masked rows, forwards and backwards."""
    lengths = torch.tensor([[3, 2, 0]])
    q, k, v, lengths = attention_inputs(
        1, 5, 1, 4, 2, "decoder", patch_lengths=lengths, generator=generator, requires_grad=True
    )
    out = reference.patch_cross_attention(q, k, v, lengths, 2, "decoder")
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (out, *grads))


def good_args(device, direction="encoder", dtype=torch.float32):
    q, k, v, lengths = attention_inputs(1, 8, 2, 16, 2, direction, device=device, dtype=dtype)
    return [q, k, v, lengths, 2, direction, 0.25]


def call(args):
    return torch.ops.blt_ext.patch_cross_attention(*args)


def replaced(args, **changes):
    names = ["q", "k", "v", "lengths", "slots", "direction", "scale"]
    return [changes.get(name, arg) for name, arg in zip(names, args)]


def test_errors(device):
    args = good_args(device)
    q, k, v, lengths = args[:4]
    with pytest.raises(ValueError, match=r'must be "encoder" or "decoder", got "sideways"'):
        call(replaced(args, direction="sideways"))
    with pytest.raises(ValueError, match=r"direction must be"):
        ops.patch_cross_attention(q, k, v, lengths, 2, direction="sideways")
    with pytest.raises(ValueError, match=r"q must be a 4-D tensor \[B, Sq, H, Dh\], got shape"):
        call(replaced(args, q=q[0]))
    with pytest.raises(ValueError, match=r"k must be a 4-D tensor"):
        call(replaced(args, k=k.flatten(2)))
    with pytest.raises(TypeError, match=r"q and k must have the same dtype, got Float and Double"):
        call(replaced(args, k=k.double()))
    with pytest.raises(TypeError, match=r"q and v must have the same dtype"):
        call(replaced(args, v=v.half()))
    with pytest.raises(TypeError, match=r"q must be a floating tensor"):
        call(replaced(args, q=q.int(), k=k.int(), v=v.int()))
    wide = torch.zeros(*q.shape[:3], 264, device=device)
    rule = r"q.size\(3\) \(head dim Dh\) must be in \[1, 256\], got 264"
    with pytest.raises(ValueError, match=rule):
        call(replaced(args, q=wide, k=wide[:, :8].contiguous(), v=wide[:, :8].contiguous()))
    with pytest.raises(ValueError, match=r"k.size\(2\) \(number of heads H\) must be 2, got 3"):
        call(replaced(args, k=torch.zeros(1, 8, 3, 16, device=device)))
    with pytest.raises(ValueError, match=r"v.size\(3\) \(head dim Dh\) must be 16"):
        call(replaced(args, v=torch.zeros(1, 8, 2, 8, device=device)))
    rule = rf"q.size\(1\) \(P \* slots patch query rows\) must be {lengths.shape[1] * 2}"
    with pytest.raises(ValueError, match=rule):
        call(replaced(args, q=q[:, 1:].contiguous()))
    with pytest.raises(ValueError, match=r"v.size\(1\) \(number of bytes T, as k\) must be 8, got"):
        call(replaced(args, v=v[:, 1:].contiguous()))
    with pytest.raises(ValueError, match=r"slots must be at least 1, got 0"):
        call(replaced(args, slots=0))
    with pytest.raises(ValueError, match=r"q must be contiguous"):
        call(replaced(args, q=q.transpose(1, 2).contiguous().transpose(1, 2)))
    with pytest.raises(TypeError, match=r"patch_lengths must have dtype Long, got Int"):
        call(replaced(args, lengths=lengths.int()))
    with pytest.raises(ValueError, match=r"patch_lengths.size\(0\) \(batch size B\) must be 1"):
        call(replaced(args, lengths=lengths.expand(2, -1)))
    with pytest.raises(ValueError, match=r"patch_lengths must be a 2-D tensor"):
        call(replaced(args, lengths=lengths[0]))

    dec = good_args(device, "decoder")
    n = dec[3].shape[1] * 2
    with pytest.raises(ValueError, match=rf"k.size\(1\) \(P \* slots patch key rows\) must be {n}"):
        call(replaced(dec, k=dec[1][:, 1:].contiguous()))
    if device.type == "cpu":  # value checks read the data: CPU only (no host sync on CUDA)
        bad = lengths.clone()
        bad[0, -1] += 3
        with pytest.raises(ValueError, match=r"must sum to T = 8 or T \+ 1 = 9 \(include_next"):
            call(replaced(args, lengths=bad))
        bad = lengths.clone()
        bad[0, 0], bad[0, 1] = -1, bad[0, 1] + 2
        with pytest.raises(ValueError, match=r"patch_lengths must be non-negative, got -1"):
            call(replaced(args, lengths=bad))
    else:
        with pytest.raises(ValueError, match=r"q and patch_lengths must be on the same device"):
            call(replaced(args, lengths=lengths.cpu()))


def test_backward_errors(device):
    q, k, v, lengths, slots, direction, scale = good_args(device)
    out, lse = torch.ops.blt_ext.patch_cross_attention(q, k, v, lengths, slots, direction, scale)
    grad = torch.randn_like(out)

    def backward(**changes):
        values = dict(grad=grad, out=out, lse=lse)
        values.update(changes)
        return torch.ops.blt_ext.patch_cross_attention_backward(
            values["grad"], q, k, v, values["out"], values["lse"], lengths, slots, direction, scale
        )

    with pytest.raises(ValueError, match=r"grad_output must have the shape of q"):
        backward(grad=grad[:, 1:])
    with pytest.raises(TypeError, match=r"q and output must have the same dtype"):
        backward(out=out.double())
    with pytest.raises(TypeError, match=r"lse must have dtype Float, got Double"):
        backward(lse=lse.double())
    with pytest.raises(ValueError, match=r"lse.size\(2\) \(number of query rows Sq\)"):
        backward(lse=lse[:, :, 1:])
    with pytest.raises(ValueError, match=r"grad_output must be contiguous"):
        backward(grad=grad.transpose(1, 2).contiguous().transpose(1, 2))


def test_empty_batch(device):
    q, k, v, lengths = attention_inputs(0, 8, 2, 16, 2, "encoder", device=device)
    out, lse = torch.ops.blt_ext.patch_cross_attention(q, k, v, lengths, 2, "encoder", 0.25)
    assert out.shape == q.shape and lse.shape == (0, 2, q.shape[1])
