"""Inputs of the hash n-gram ops, shared by tests/test_hash_ngram.py and the benchmarks."""

import torch

TOKEN_VOCAB = 260  # 256 bytes + 4 specials (BLT_SPEC.md a)
BOS_ID = 1
OFFSET = 4


def random_tokens(batch, seq, *, text=False, generator=None, device="cpu"):
    """[B, T] int64 token ids. ``text``: printable ASCII bytes + 4 after a BOS, like the model's
    input (few distinct rows, so the byte table takes many contributions per row); otherwise
    uniform over all 260 ids."""
    if text:
        tokens = torch.randint(32 + OFFSET, 127 + OFFSET, (batch, seq), generator=generator)
        if seq:
            tokens[:, 0] = BOS_ID
    else:
        tokens = torch.randint(0, TOKEN_VOCAB, (batch, seq), generator=generator)
    return tokens.to(device)


def embedding_weights(
    num_tables,
    vocab,
    dim,
    *,
    byte_rows=TOKEN_VOCAB,
    dtype=torch.float32,
    std=None,
    generator=None,
    device="cpu",
):
    """(byte_weight [byte_rows, D], hash_weight [num_tables * vocab, D]).

    Truncated normal at +-3 std, std = D^-0.5 by default as in BLT's init (BLT_SPEC.md b).
    Drawn on the CPU with ``generator``, else directly on ``device`` (the released tables hold
    3 billion values).
    """
    std = dim**-0.5 if std is None else std

    def table(rows):
        w = torch.empty(
            rows, dim, dtype=torch.float32, device="cpu" if generator is not None else device
        )
        torch.nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std, generator=generator)
        return w.to(device=device, dtype=dtype)

    return table(byte_rows), table(num_tables * vocab)
