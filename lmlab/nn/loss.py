"""Cross-entropy of a linear output layer, computed in chunks without materialising the logits.

For a batch of N positions and a vocabulary of V, the usual path builds an N x V logit matrix, a
float32 copy for `log_softmax`, and the same again in the backward pass. Here the forward pass walks
over chunks of positions, computes each chunk's logits, its loss and — when gradients are needed —
its gradient (softmax - one_hot) / n straight away, and keeps only the N x C gradient of the input
and the V x C gradient of the weight. Memory is O(chunk x V) instead of O(N x V), and the time spent
in soft-max passes and dtype copies drops (the same idea as the "fused linear cross-entropy" of
Liger-Kernel and of Wijmans et al. 2024, "Cut your losses").

Under autocast the matmuls run in the autocast dtype; soft-max and loss are always float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.nn.device_paths import compute_dtype, cpu_kernels

# Under bf16/fp16 the weight gradient is summed in the compute dtype over this many chunks (`addmm`
# accumulates each product in float32 and rounds once per chunk, as an autocast Linear's weight gradient
# is rounded once), then added into a float32 total: a float32 add per chunk, with its float32 copy of
# the [V, C] partial, cost more than the soft-max. With no more chunks than this (the usual case) the
# partial sum itself is kept, and the backward pass turns it into the float32 gradient in one product.
_LOW_PRECISION_CHUNKS = 8
_GENERIC_CHUNK_LOGITS = 1 << 28  # logits per chunk off the CPU path (see linear_cross_entropy)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                ignore_index: int, compute_dtype: torch.dtype) -> torch.Tensor:
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        n, V = x.shape[0], weight.shape[0]
        xs, w = x.to(compute_dtype), weight.to(compute_dtype)
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1).to(torch.float32)
        safe_targets = targets.clamp(min=0)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if need_x else None
        # the weight gradient times n_valid: `partial` sums up to `group` chunks' products, and `total`
        # (float32) the partial sums, when there are more chunks than one group
        group = _LOW_PRECISION_CHUNKS if compute_dtype != torch.float32 else n
        partial = torch.empty(V, x.shape[1], dtype=compute_dtype, device=x.device) if need_w else None
        total = None
        # One logits and one probabilities buffer serve every chunk: fresh chunk-sized tensors would
        # each be new pages for the allocator to fault in.
        c = min(chunk_size, n)
        several_groups = -(-n // c) > group
        logits_buf = torch.empty(c, V, dtype=compute_dtype, device=x.device)
        probs_buf = torch.empty_like(logits_buf)
        for i, s in enumerate(range(0, n, c)):
            e = min(s + c, n)
            tgt, v = safe_targets[s:e], valid[s:e]
            rows = torch.arange(e - s, device=x.device)
            # Soft-max straight from the compute-dtype logits (it accumulates in float32 inside),
            # so no float32 copy of the chunk is made; the loss is -log p(target) in float32.
            logits, probs = logits_buf[:e - s], probs_buf[:e - s]
            torch.mm(xs[s:e], w.t(), out=logits)
            torch.softmax(logits, dim=-1, out=probs)
            p_target = probs[rows, tgt].float().clamp_min(torch.finfo(torch.float32).tiny)
            loss -= (p_target.log() * v).sum()
            if need_x or need_w:
                # d loss / d logits = (softmax - one_hot) / n_valid on valid rows, 0 elsewhere; the
                # row weights are applied to the (much smaller) [chunk, C] operands and results.
                g = probs
                g[rows, tgt] -= 1.0
                row_weight = v.to(torch.float32)[:, None]
                if need_x:
                    grad_x[s:e] = ((g @ w).float() * (row_weight / n_valid)).to(x.dtype)
                if need_w:
                    xw = xs[s:e] * row_weight.to(compute_dtype)
                    k = i % group
                    torch.addmm(partial, g.t(), xw, beta=1 if k else 0, out=partial)
                    if several_groups and (k == group - 1 or e == n):
                        total = partial.float() if total is None else total.add_(partial)
        grad_w_sum = (partial if total is None else total) if need_w else None
        ctx.save_for_backward(grad_x if need_x else None, grad_w_sum, n_valid)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x, grad_w_sum, n_valid = ctx.saved_tensors
        gx = grad_x * grad_out.to(grad_x.dtype) if grad_x is not None else None
        gw = None
        if grad_w_sum is not None:  # in float32, then the weight's dtype
            scale = grad_out / n_valid
            # a mixed-dtype product would first copy the bf16 sum to float32, then allocate the result
            low = grad_w_sum.dtype != torch.float32
            gw = (grad_w_sum.float().mul_(scale) if low else grad_w_sum * scale).to(ctx.weight_dtype)
        return gx, gw, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         chunk_size: int = 512, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of `x @ weight.T` ([N, C] @ [C, V]) against `targets` ([N]).

    `chunk_size` positions per chunk suit a CPU's caches; off the CPU path (lmlab/nn/device_paths.py:
    a GPU, or torch.compile) chunks hold up to `_GENERIC_CHUNK_LOGITS` logits instead, so that a long
    batch costs a few large kernels rather than one small group per 512 positions, while the logits
    still never exist whole (gpt2's vocabulary at 16 x 1024 positions: 4 chunks of up to 5,341 rows, two
    0.54 GB buffers in bf16, against 3.3 GB of float32 logits unchunked). Each chunk costs ~29 ATen
    operators, a GPU step's host overhead (tests/test_device_paths.py counts them)."""
    dtype = compute_dtype(x)
    if not cpu_kernels(x):
        chunk_size = max(chunk_size, _GENERIC_CHUNK_LOGITS // weight.shape[0])
        if torch.compiler.is_compiling() and x.shape[0] <= chunk_size and dtype != torch.float32:
            # One chunk would hold all the logits anyway, and compiled under bf16 the plain ops, which
            # Inductor fuses, measured 1.00-1.09x transformers against 0.85-0.94x for the Function on
            # this CPU (small config, issue 22); in float32 the Function was the faster (1.01-1.03x).
            return F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index)
    with torch.autocast(x.device.type, enabled=False):
        return _LinearCrossEntropy.apply(x, weight, targets, chunk_size, ignore_index, dtype)

