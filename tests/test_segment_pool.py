"""segment_pool / segment_pool_backward against the scatter_reduce reference of the original BLT."""

import pytest
import torch

import blt_ext
from blt_ext import ops, reference
from blt_ext.testing import PATCH_LAYOUTS, assert_close_to_reference, one_byte_patches_with_gaps
from blt_ext.testing.segment_pool import first_winner_grad, segment_pool_inputs

REDUCTIONS = ("max", "mean", "min")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def expected_arg_index(x, patch_lengths, reduce):
    """The first byte holding each patch's max/min, -1 for patches without real bytes."""
    x = x.detach().double().cpu()
    batch, num_bytes, dim = x.shape
    arg = torch.full((batch, patch_lengths.shape[1], dim), -1, dtype=torch.int32)
    pick = torch.argmax if reduce == "max" else torch.argmin  # both return the first extremum
    for b, row in enumerate(patch_lengths.tolist()):
        start = 0
        for p, n in enumerate(row):
            s, e = min(start, num_bytes), min(start + n, num_bytes)
            if e > s:
                arg[b, p] = s + pick(x[b, s:e], dim=0)
            start += n
    return arg


def check_against_reference(x, patch_lengths, reduce, generator):
    """Forward (and arg_index) and the gradient of x, against the float64 reference."""
    out, arg_index = torch.ops.blt_ext.segment_pool(x, patch_lengths, reduce)
    x64 = x.detach().double().requires_grad_()
    expected = reference.segment_pool(x64, patch_lengths, reduce)
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert_close_to_reference(out, expected, x.dtype)
    if reduce == "mean":
        assert arg_index.dtype == torch.int32 and arg_index.shape == (0,)
    else:
        torch.testing.assert_close(
            arg_index.cpu(), expected_arg_index(x, patch_lengths, reduce), rtol=0, atol=0
        )

    grad = torch.randn(expected.shape, generator=generator, dtype=torch.float64).to(
        x.device, x.dtype
    )
    xg = x.detach().requires_grad_()
    ops.segment_pool(xg, patch_lengths, reduce).backward(grad)
    expected.backward(grad.double())
    assert xg.grad.dtype == x.dtype
    assert_close_to_reference(xg.grad, x64.grad, x.dtype)


@pytest.mark.parametrize("include_next_token", [True, False], ids=["sum_T+1", "sum_T"])
@pytest.mark.parametrize("layout", PATCH_LAYOUTS)
@pytest.mark.parametrize("dim", [13, 136])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_matches_reference(device, generator, reduce, dtype, dim, layout, include_next_token):
    # T = 250: the long_patch layout has a patch of ~246 bytes; 2 zero-length padding patches.
    x, lengths = segment_pool_inputs(
        3,
        250,
        dim,
        dtype=dtype,
        device=device,
        layout=layout,
        include_next_token=include_next_token,
        extra_patches=2,
        generator=generator,
    )
    check_against_reference(x, lengths, reduce, generator)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_random_shapes(device, generator, reduce):
    for _ in range(6):
        batch, num_bytes, dim = (
            int(torch.randint(1, hi, (), generator=generator)) for hi in (4, 200, 80)
        )
        x, lengths = segment_pool_inputs(
            batch,
            num_bytes,
            dim,
            dtype=torch.float32,
            device=device,
            include_next_token=bool(torch.randint(0, 2, (), generator=generator)),
            extra_patches=int(torch.randint(0, 3, (), generator=generator)),
            generator=generator,
        )
        check_against_reference(x, lengths, reduce, generator)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_thousands_of_patches(device, generator, reduce):
    """Over 4,096 patches per row: the CUDA ends' scan runs several 2,048-patch tiles, with
    zero-length patches on and beside the tile boundaries."""
    num_bytes = 4200
    row = one_byte_patches_with_gaps(1, num_bytes, [700, 2047, 2048, 4096])
    lengths = torch.cat([row, row.flip(1)]).to(device)
    x = torch.randn(2, num_bytes, 8, generator=generator).to(device)
    check_against_reference(x, lengths, reduce, generator)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_empty_sequence(device, reduce):
    x = torch.empty(2, 0, 8, device=device, requires_grad=True)
    lengths = torch.tensor(
        [[0, 0], [1, 0]], device=device
    )  # sums T = 0 and T + 1 (virtual byte only)
    out, arg_index = torch.ops.blt_ext.segment_pool(x, lengths, reduce)
    assert torch.equal(out, torch.zeros(2, 2, 8, device=device))
    if reduce != "mean":
        assert torch.equal(arg_index, torch.full((2, 2, 8), -1, dtype=torch.int32, device=device))
    ops.segment_pool(x, lengths, reduce).sum().backward()
    assert x.grad.shape == (2, 0, 8)


# Hand-made: ties, an empty patch between two others, a last patch holding only the virtual byte.
TIE_X = [[1.0, 0.0], [1.0, -1.0], [3.0, -2.0], [5.0, -2.0], [5.0, 7.0], [2.0, 4.0]]
TIE_LENGTHS = [2, 0, 3, 1, 1]  # bytes {0, 1}, {}, {2, 3, 4}, {5}, {virtual byte 6}
TIE_GRAD = [[10.0, 20.0], [30.0, 40.0], [50.0, 60.0], [70.0, 80.0], [90.0, 100.0]]
TIE_EXPECTED = {
    # (out, arg_index, grad_x for TIE_GRAD): ties go to the first byte.
    "max": (
        [[1, 0], [0, 0], [5, 7], [2, 4], [0, 0]],
        [[0, 0], [-1, -1], [3, 4], [5, 5], [-1, -1]],
        [[10, 20], [0, 0], [0, 0], [50, 0], [0, 60], [70, 80]],
    ),
    "min": (
        [[1, -1], [0, 0], [3, -2], [2, 4], [0, 0]],
        [[0, 1], [-1, -1], [2, 2], [5, 5], [-1, -1]],
        [[10, 0], [0, 20], [50, 60], [0, 0], [0, 0], [70, 80]],
    ),
    "mean": (
        [[1, -0.5], [0, 0], [13 / 3, 1], [2, 4], [0, 0]],
        None,
        [[5, 10], [5, 10], [50 / 3, 20], [50 / 3, 20], [50 / 3, 20], [70, 80]],
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_ties_and_empty_patches_by_hand(device, reduce, dtype):
    x = torch.tensor([TIE_X], dtype=dtype, device=device, requires_grad=True)
    lengths = torch.tensor([TIE_LENGTHS], device=device)
    out, arg_index = torch.ops.blt_ext.segment_pool(x, lengths, reduce)
    want_out, want_arg, want_grad = (
        None if v is None else torch.tensor([v], device=device) for v in TIE_EXPECTED[reduce]
    )
    torch.testing.assert_close(out, want_out.to(dtype))
    if want_arg is not None:
        assert torch.equal(arg_index, want_arg.int())
    ops.segment_pool(x, lengths, reduce).backward(
        torch.tensor([TIE_GRAD], dtype=dtype, device=device)
    )
    torch.testing.assert_close(x.grad, want_grad.to(dtype))


@pytest.mark.parametrize("reduce", ["max", "min"])
def test_first_winner_grad_by_hand(reduce):
    """The tie rule's independent expectation (used where ties are unavoidable) on the hand case."""
    x, lengths = torch.tensor([TIE_X]), torch.tensor([TIE_LENGTHS])
    want_out, _, want_grad = TIE_EXPECTED[reduce]
    got = first_winner_grad(x, torch.tensor([want_out], dtype=x.dtype), lengths, torch.tensor([TIE_GRAD]))
    assert torch.equal(got, torch.tensor([want_grad], dtype=x.dtype))


def test_nan_propagates_like_amax(device):
    x = torch.tensor([[[1.0], [float("nan")], [3.0], [float("nan")]]], device=device)
    out, arg_index = torch.ops.blt_ext.segment_pool(x, torch.tensor([[4]], device=device), "max")
    assert torch.isnan(out).all() and arg_index.item() == 1
    assert torch.isnan(reference.segment_pool(x, torch.tensor([[4]], device=device), "max")).all()


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_gradcheck(device, generator, reduce):
    x, lengths = segment_pool_inputs(
        2, 12, 3, dtype=torch.float64, device=device, extra_patches=1, generator=generator
    )
    assert torch.autograd.gradcheck(
        lambda t: ops.segment_pool(t, lengths, reduce), (x.requires_grad_(),)
    )


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_opcheck(device, generator, reduce):
    x, lengths = segment_pool_inputs(2, 20, 16, device=device, extra_patches=1, generator=generator)
    torch.library.opcheck(
        torch.ops.blt_ext.segment_pool.default, (x.requires_grad_(), lengths, reduce)
    )
    _, arg_index = torch.ops.blt_ext.segment_pool(x.detach(), lengths, reduce)
    grad = torch.randn(2, lengths.shape[1], 16, generator=generator).to(device)
    torch.library.opcheck(
        torch.ops.blt_ext.segment_pool_backward.default, (grad, arg_index, lengths, 20, reduce)
    )


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_compile_matches_eager(device, generator, reduce):
    torch._dynamo.reset()  # the recompile limit counts the graphs of earlier cases on other devices
    compiled = torch.compile(ops.segment_pool, fullgraph=True, dynamic=True)
    for num_bytes in (30, 47):  # a second shape reuses the dynamic graph
        x, lengths = segment_pool_inputs(
            2, num_bytes, 24, device=device, extra_patches=1, generator=generator
        )
        grad = torch.randn(2, lengths.shape[1], 24, generator=generator).to(device)
        results = []
        for fn in (compiled, ops.segment_pool):
            xg = x.clone().requires_grad_()
            out = fn(xg, lengths, reduce)
            out.backward(grad)
            results.append((out, xg.grad))
        torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_every_output_element_written(device, generator, reduce):
    # Deterministic mode fills torch.empty / at::empty with NaN (floats) and INT_MAX (ints).
    with_deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(4, device=device)).all()
        for layout in PATCH_LAYOUTS:
            for include_next_token in (True, False):
                x, lengths = segment_pool_inputs(
                    2,
                    40,
                    20,
                    device=device,
                    layout=layout,
                    include_next_token=include_next_token,
                    extra_patches=2,
                    generator=generator,
                )
                out, arg_index = torch.ops.blt_ext.segment_pool(x, lengths, reduce)
                assert not torch.isnan(out).any()
                assert (arg_index < x.shape[1]).all()
                grad = torch.ones_like(out)
                grad_x = torch.ops.blt_ext.segment_pool_backward(
                    grad, arg_index, lengths, x.shape[1], reduce
                )
                assert not torch.isnan(grad_x).any()
    finally:
        torch.use_deterministic_algorithms(with_deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _lengths(rows, device):
    return torch.tensor(rows, device=device)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (
            lambda d: (torch.zeros(4, 5, device=d), _lengths([[4]], d), "max"),
            ValueError,
            r"x must be a 3-D tensor \[B, T, D\], got shape \[4, 5\]",
        ),
        (
            lambda d: (
                torch.zeros(1, 4, 2, dtype=torch.int32, device=d),
                _lengths([[4]], d),
                "max",
            ),
            TypeError,
            "x must be a floating tensor",
        ),
        (
            lambda d: (torch.zeros(1, 4, 2, device=d), _lengths([[4.0]], d), "max"),
            TypeError,
            "patch_lengths must have dtype Long, got Float",
        ),
        (
            lambda d: (torch.zeros(2, 4, 2, device=d), _lengths([[4]], d), "max"),
            ValueError,
            r"patch_lengths.size\(0\) \(batch size B\) must be 2, got 1",
        ),
        (
            lambda d: (torch.zeros(1, 4, 2, device=d), _lengths([[4]], d), "sum"),
            ValueError,
            'reduce must be one of "max", "mean", "min", got "sum"',
        ),
        (
            lambda d: (torch.zeros(1, 2, 4, device=d).transpose(1, 2), _lengths([[4]], d), "max"),
            ValueError,
            "x must be contiguous",
        ),
    ],
    ids=[
        "x_rank_2",
        "integer_x",
        "float_lengths",
        "batch_mismatch",
        "bad_reduce",
        "non_contiguous_x",
    ],
)
def test_bad_arguments(device, make, error, match):
    with pytest.raises(error, match="blt_ext.segment_pool: " + match):
        torch.ops.blt_ext.segment_pool(*make(device))


@pytest.mark.parametrize(
    "rows, match",
    [
        ([[2, -1, 3]], r"patch_lengths must be non-negative, got -1 at \[0, 1\]"),
        ([[2, 1]], r"each row of patch_lengths must sum to T = 4 or T \+ 1 = 5 .*got 3 in row 0"),
        ([[4, 2]], r"each row of patch_lengths must sum to T = 4 .*got 6 in row 0"),
    ],
    ids=["negative_length", "row_sum_short", "row_sum_long"],
)
def test_bad_patch_length_values_cpu(rows, match):
    # Value checks read the data, so they run on CPU only (CUDA would need a host sync).
    x = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="blt_ext.segment_pool: " + match):
        torch.ops.blt_ext.segment_pool(x, _lengths(rows, "cpu"), "max")
    with pytest.raises(ValueError, match="blt_ext.segment_pool_backward: " + match):
        torch.ops.blt_ext.segment_pool_backward(
            torch.zeros(1, len(rows[0]), 2),
            torch.zeros(0, dtype=torch.int32),
            _lengths(rows, "cpu"),
            4,
            "mean",
        )


def test_bad_backward_arguments(device):
    grad = torch.zeros(1, 2, 3, device=device)
    lengths = _lengths([[2, 2]], device)
    arg = torch.zeros(1, 2, 3, dtype=torch.int32, device=device)
    backward = torch.ops.blt_ext.segment_pool_backward
    with pytest.raises(
        TypeError, match="segment_pool_backward: arg_index must have dtype Int, got Long"
    ):
        backward(grad, arg.long(), lengths, 4, "max")
    with pytest.raises(
        ValueError, match=r"segment_pool_backward: arg_index.size\(2\) .* must be 3, got 2"
    ):
        backward(grad, arg[..., :2].contiguous(), lengths, 4, "max")
    with pytest.raises(
        ValueError, match="segment_pool_backward: num_bytes must be non-negative, got -1"
    ):
        backward(grad, arg, lengths, -1, "max")
    with pytest.raises(
        ValueError, match='segment_pool_backward: reduce must be one of .*got "avg"'
    ):
        backward(grad, arg, lengths, 4, "avg")


def test_backward_rejects_foreign_arg_index_cpu():
    arg = torch.tensor([[[0], [1]]], dtype=torch.int32)  # byte 1 is in patch 0, not patch 1
    with pytest.raises(
        ValueError, match=r"arg_index must hold a byte of its patch \[2, 4\), got 1 at \[0, 1, 0\]"
    ):
        torch.ops.blt_ext.segment_pool_backward(
            torch.ones(1, 2, 1), arg, _lengths([[2, 2]], "cpu"), 4, "max"
        )


if torch.cuda.is_available() and blt_ext.WITH_CUDA:

    @pytest.mark.cuda
    def test_device_mismatch():
        with pytest.raises(ValueError, match="x and patch_lengths must be on the same device"):
            torch.ops.blt_ext.segment_pool(
                torch.zeros(1, 4, 2, device="cuda"), _lengths([[4]], "cpu"), "max"
            )
