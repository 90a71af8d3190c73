"""The levers left for the CPU side by side (c), measured one kernel at a time.

``profile_step.py`` says where a MiniLM step's time goes; this script times the pieces
alone, JAX against PyTorch on the same shapes (batch 32 x 64 tokens, MiniLM's 12 heads of
32, hidden 384, FFN 1536), forward and backward together, to say how much each candidate
fix could win before anyone builds it:

* attention: peftjax's two paths (the explicit softmax it keeps for attention dropout,
  and ``lean_backward.attention``, which it runs without), and
  ``jax.nn.dot_product_attention``, against PyTorch's fused
  ``scaled_dot_product_attention``, with leaves in JAX's (B, T, N, H) layout (transposed
  for torch, whose gradients then come back through the transposes) and in torch's own;
* GELU: the exact (erf) form the checkpoint uses, against the tanh approximation;
* the step's matmul shapes, as GFLOP/s (``x @ W`` forward, ``g @ W.T`` and ``x.T @ g``
  backward).

Medians of ``--repeats`` calls after 3 warm-up calls; torch uses 2 threads.

    python benchmarks/cpu_kernels.py --json benchmarks/results/minilm_cpu_kernels.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from peftjax.models import common

BATCH, SEQ, HEADS, HEAD_DIM, HIDDEN, FFN = 32, 64, 12, 32, 384, 1536
TOKENS = BATCH * SEQ


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def jax_forward_backward(fn, *inputs):
    """A jitted call returning fn's output and the gradients of <output, cotangent>."""
    cotangent = jnp.ones_like(jax.eval_shape(fn, *inputs))

    @jax.jit
    def both(*args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cotangent)

    return lambda: both(*inputs)


def torch_forward_backward(fn, *inputs):
    leaves = [torch.tensor(np.asarray(x), requires_grad=True) for x in inputs]

    def both():
        out = fn(*leaves)
        return out, torch.autograd.grad(out, leaves, torch.ones_like(out))

    return both


def attention(repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((BATCH, SEQ, HEADS, HEAD_DIM)), jnp.float32) for _ in range(3))
    mask_bts = jnp.ones((BATCH, SEQ, SEQ), bool)
    no_dropout = nnx.Dropout(0.0, rngs=nnx.Rngs(0))
    ours = functools.partial(common.dot_product_attention, mask_bts=mask_bts, dropout=no_dropout)
    xla = functools.partial(jax.nn.dot_product_attention, mask=mask_bts[:, None])
    explicit = functools.partial(common.explicit_attention, mask_bts=mask_bts, dropout=no_dropout)
    to_bnth = lambda x: x.transpose(1, 2)  # noqa: E731  (torch's layout: heads before tokens)
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(to_bnth(q), to_bnth(k), to_bnth(v))  # noqa: E731
    bnth = [jnp.swapaxes(x, 1, 2) for x in (q, k, v)]
    return {
        "peftjax explicit_attention (the path with attention dropout)": median_ms(
            jax_forward_backward(explicit, q, k, v), repeats),
        "peftjax dot_product_attention (lean_backward.attention)": median_ms(
            jax_forward_backward(ours, q, k, v), repeats),
        "jax.nn.dot_product_attention (xla), boolean mask": median_ms(jax_forward_backward(xla, q, k, v), repeats),
        "torch scaled_dot_product_attention, (B, T, N, H) leaves transposed": median_ms(
            torch_forward_backward(sdpa, q, k, v), repeats),
        # As in the training step: HF builds (B, N, T, H) views; leaves already in that layout.
        "torch scaled_dot_product_attention, (B, N, T, H) leaves": median_ms(
            torch_forward_backward(torch.nn.functional.scaled_dot_product_attention, *bnth), repeats),
    }  # fmt: skip


def gelu(repeats: int) -> dict[str, float]:
    x = jnp.asarray(np.random.default_rng(0).standard_normal((BATCH, SEQ, FFN)), jnp.float32)
    return {
        "jax exact (erf)": median_ms(jax_forward_backward(common.activation("gelu"), x), repeats),
        "jax tanh approximation": median_ms(jax_forward_backward(common.activation("gelu_new"), x), repeats),
        "torch exact (erf)": median_ms(torch_forward_backward(torch.nn.functional.gelu, x), repeats),
    }


def matmuls(repeats: int) -> list[dict]:
    """(m, k, n, transposed operand) for the forward, input-gradient and weight-gradient products."""
    shapes = [
        ("x @ W", TOKENS, HIDDEN, HIDDEN, None), ("x @ W", TOKENS, HIDDEN, FFN, None),
        ("x @ W", TOKENS, FFN, HIDDEN, None), ("g @ W.T", TOKENS, HIDDEN, HIDDEN, "b"),
        ("g @ W.T", TOKENS, FFN, HIDDEN, "b"), ("x.T @ g", HIDDEN, TOKENS, HIDDEN, "a"),
        ("x.T @ g", HIDDEN, TOKENS, FFN, "a"),
    ]  # fmt: skip
    rng = np.random.default_rng(0)
    rows = []
    for label, m, k, n, transposed in shapes:
        a = rng.standard_normal((k, m) if transposed == "a" else (m, k)).astype(np.float32)
        b = rng.standard_normal((n, k) if transposed == "b" else (k, n)).astype(np.float32)

        def product(a, b):
            return (a.T if transposed == "a" else a) @ (b.T if transposed == "b" else b)

        jitted, ja, jb, ta, tb = jax.jit(product), jnp.asarray(a), jnp.asarray(b), torch.tensor(a), torch.tensor(b)
        gflop = 2 * m * k * n / 1e9
        rows.append({
            "product": label, "m": m, "k": k, "n": n,
            "jax_gflops": gflop / median_ms(lambda: jitted(ja, jb), repeats) * 1e3,
            "torch_gflops": gflop / median_ms(lambda: product(ta, tb), repeats) * 1e3,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    result = {
        "shapes": {"batch": BATCH, "seq": SEQ, "heads": HEADS, "head_dim": HEAD_DIM, "hidden": HIDDEN, "ffn": FFN},
        "device": f"cpu ({os.cpu_count()} cores)",
        "load_before": os.getloadavg(),
        "attention_fwd_bwd_ms_per_layer": attention(args.repeats),
        "gelu_fwd_bwd_ms_per_layer": gelu(args.repeats),
        "matmul_gflops": matmuls(args.repeats),
        "load_after": os.getloadavg(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
