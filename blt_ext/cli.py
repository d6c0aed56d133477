"""The ``blt-ext`` command line (also ``python -m blt_ext``).

    blt-ext ops     the registered ops: schema and the devices that have a kernel
    blt-ext env     what this build was compiled against and what torch sees
    blt-ext demo    the main job: op table, then every op checked and timed against its twin
"""

import argparse
import sys
import time

import torch

import blt_ext

OPS = [
    "hash_ngram_ids",
    "hash_ngram_embedding",
    "hash_ngram_embedding_backward",
    "entropy",
    "entropy_patch_starts",
    "space_patch_starts",
    "patch_layout",
    "segment_pool",
    "segment_pool_backward",
    "patch_cross_attention",
    "patch_cross_attention_backward",
]


def op_table():
    rows = []
    for name in OPS:
        qualname = f"blt_ext::{name}"
        kernels = [key for key in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)]
        schema = str(getattr(torch.ops.blt_ext, name).default._schema)
        rows.append((name, ", ".join(kernels) or "none", schema.removeprefix("blt_ext::")))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'op':<{width}}  kernels    schema"]
    lines += [f"{name:<{width}}  {kernels:<9}  {schema}" for name, kernels, schema in rows]
    return "\n".join(lines)


def cmd_ops(args):
    print(op_table())
    return 0


def cmd_env(args):
    from . import _build_info

    print(f"blt_ext {blt_ext.__version__} built against torch {_build_info.TORCH_VERSION}"
          f" (CUDA kernels: {'yes, ' + _build_info.CUDA_ARCHITECTURES if _build_info.WITH_CUDA else 'no'})")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    return 0


def _median_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


def demo_cases(device):
    """(name, ext call, reference call, comparison) on inputs a 2-core CPU handles in a second."""
    from . import ops, reference
    from .testing import random_patch_lengths

    g = torch.Generator().manual_seed(0)
    B, T, D, H, Dh, slots = 2, 2048, 256, 8, 32, 2
    tokens = torch.randint(4, 260, (B, T), generator=g).to(device)
    byte_w = torch.randn(260, D, generator=g).to(device)
    hash_w = torch.randn(6 * 50002, D, generator=g).to(device)
    logits = (3 * torch.randn(B, T, 260, generator=g)).to(device)
    lengths = random_patch_lengths(B, T, generator=g).to(device)
    P = lengths.shape[1]
    x = torch.randn(B, T, D, generator=g).to(device)
    q = torch.randn(B, P * slots, H, Dh, generator=g).to(device)
    kv = torch.randn(B, T, H, Dh, generator=g).to(device)

    def same(a, b):
        return all(torch.equal(u, v) for u, v in zip(a, b))

    return [
        ("hash_ngram_embedding", lambda m: m.hash_ngram_embedding(tokens, byte_w, hash_w),
         lambda a, b: torch.allclose(a, b, atol=1e-4, rtol=1e-4)),
        ("entropy_patch", lambda m: m.entropy_patch(logits), same),
        ("segment_pool (max)", lambda m: m.segment_pool(x, lengths, "max"), torch.equal),
        ("patch_cross_attention (encoder)",
         lambda m: m.patch_cross_attention(q, kv, kv, lengths, slots, "encoder"),
         lambda a, b: torch.allclose(a, b, atol=1e-4, rtol=1e-4)),
    ], (ops, reference)


def cmd_demo(args):
    device = torch.device(args.device)
    print(op_table(), "\n")
    cases, (ops, reference) = demo_cases(device)
    print(f"ext kernels vs pure-PyTorch references on {device} (median of {args.reps} runs)")
    print(f"{'workload':<34} {'matches':>8} {'ext':>10} {'torch':>10} {'speedup':>8}")
    ok = True
    for name, call, agree in cases:
        match = bool(agree(call(ops), call(reference)))
        ok &= match
        t_ext = _median_ms(lambda: call(ops), args.reps)
        t_ref = _median_ms(lambda: call(reference), args.reps)
        print(f"{name:<34} {'yes' if match else 'NO':>8} {t_ext:>8.2f}ms {t_ref:>8.2f}ms {t_ref / t_ext:>7.1f}x")
    return 0 if ok else 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="blt-ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ops", help="list the registered ops").set_defaults(func=cmd_ops)
    sub.add_parser("env", help="build and device information").set_defaults(func=cmd_env)
    demo = sub.add_parser("demo", help="the main job: check and time every op against its twin")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--reps", type=int, default=5)
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
