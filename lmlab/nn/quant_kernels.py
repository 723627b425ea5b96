"""Exact CPU kernels for GGUF's block formats, in numba: fp32 activations times weights kept as Q4_1 or
Q8_0 blocks (ggml-common.h `block_q4_1`, `block_q8_0`; 32 inputs per block, fp16 scales).

Why our own: PyTorch's 4-bit kernel (`_weight_int4pack_mm_for_cpu`) is fast only with bf16
activations and bf16 scales. On SmolLM2-135M that rounding moves logits by ~0.04 (rms), enough to swap
near-tied top tokens at ~1.2% of positions; these kernels compute with the weights exactly as stored
(w = d q + m, d and m read from fp16 exactly) and fp32 activations, so they differ from the fp32
reference only in the order and grouping of fp32 sums.

Q4_1: for block b of a row, dot(x_b, d q + m) = d dot(x_b, q) + m sum(x_b), with sum(x_b) computed once
per input row and shared by every output row; byte j of a block holds q_j (low nibble) and q_{j+16}
(high nibble), split exactly in float arithmetic (hi = floor(byte / 16), lo = byte - 16 hi). Q8_0:
d dot(x_b, q). fp32 accumulation throughout; the decoding kernels (`*_mv_t`) split the output rows over
numba's threads (`numba.set_num_threads`), the rest is single-threaded (numba releases the GIL, `nogil=True`).
Decoding (lmlab/generate/fast_decode.py) reads the weights block-major and row-minor in words of four
codes (`to_block_major`, `words`: word s of block b of all rows together, each row's codes 4s .. 4s + 3
side by side; the same bytes, reordered; GGUF layers are stored so from load, so this is a view): its
innermost loop runs over output rows, so LLVM vectorises it without a horizontal sum per block, and the
integer kernels (lmlab/nn/quant_int.py) load a word of 16 rows as one 512-bit VNNI operand; each tile
prefetches the next block (`_prefetch`), and fp16 scales stay fp16 (`_scales`). Many rows on that layout
(prefill, scoring) go through `block_major_mm`: W^T dequantized a chunk at a time into a reused buffer,
then an fp32 GEMM.

Decoding's small per-layer steps are here too, one call each instead of several PyTorch ops (a few
microseconds apiece, which at one token per step add up to as much as reading the weights): RMSNorm,
RoPE with the KV-cache write, and attention of one query over the cache (`sdpa`).

The kernels are compiled by numba on first use and cached on disk (`cache=True`). `available()` is
False when numba does not import or `LMLAB_NO_KERNELS=1` is set; lmlab/nn/quant.py then uses PyTorch's
kernels instead.
"""

from __future__ import annotations

import os
import threading
import weakref

import numpy as np
import torch
import torch.nn.functional as F

try:
    import numba
    from llvmlite import binding as _llvm
    from llvmlite import ir as _ir
    from numba import prange
    from numba.core import cgutils as _cgutils
    from numba.core import types as _types
    from numba.extending import intrinsic as _intrinsic
    from numba.extending import overload as _overload

    from lmlab.nn import quant_int as _qint
except ImportError:  # pragma: no cover - numba is a dependency
    numba = None

# The decoding kernels' threads: numba's own "workqueue" pool, unless NUMBA_THREADING_LAYER says otherwise.
# Its OpenMP layer shares libgomp with torch, whose workers spin between parallel regions: on SmolLM2-135M
# under load that made a decoding step 0.1-1 s instead of 13-20 ms (OMP_WAIT_POLICY=passive, which must be
# set before torch is imported, fixed it too). workqueue runs one parallel call at a time per process:
# `POOL` serialises the callers (lmlab/generate/fast_decode.py), and one thread never enters it.
if numba is not None and "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
POOL = threading.Lock()

BLOCK = 32  # inputs per block in Q4_1 and Q8_0 (ggml-common.h QK4_1, QK8_0)
HALF = 8  # added to a decoding linear's kind (`linear_args`) when its scales are fp16, as the file stores them
# added to a kind, times 1 or 2: decode on int8 planes of the activations (lmlab/nn/quant_int.py), exactly as
# many planes; the rows left over from its 16-row tiles go through the fp32 kernels
PLANES = 16

# 2^(e - 25) for an fp16 exponent field e: a finite fp16 with exponent field e >= 1 and mantissa field
# m is (1024 + m) 2^(e - 25), and a subnormal (e = 0) is m 2^(1 - 25); both products are exact in fp32
_POW2 = np.array([2.0 ** (max(e, 1) - 25) for e in range(32)], dtype=np.float32)


def _njit(*args, **kwargs):
    return numba.njit(*args, cache=True, nogil=True, **kwargs)


if numba is not None:
    # llvm.prefetch's name mangles its pointer type: "p0" with LLVM's opaque pointers (LLVM >= 15)
    _PREFETCH = "llvm.prefetch.p0" if _llvm.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"

    @_intrinsic
    def _prefetch(typingctx, arr, i):
        """Ask the CPU to start loading the cache line holding arr[i] (a 1-D array) into L1 (LLVM's
        llvm.prefetch: read, high locality, data); no effect on results."""
        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = _cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]], wraparound=False,
                                            boundscheck=False)
            ptr = builder.bitcast(ptr, _ir.IntType(8).as_pointer())
            i32 = _ir.IntType(32)
            fnty = _ir.FunctionType(_ir.VoidType(), [ptr.type, i32, i32, i32])
            fn = _cgutils.get_or_insert_function(builder.module, fnty, _PREFETCH)
            builder.call(fn, [ptr, _ir.Constant(i32, 0), _ir.Constant(i32, 3), _ir.Constant(i32, 1)])
            return context.get_dummy_value()
        return _types.void(arr, i), codegen

    @_njit(fastmath=True, inline="always")
    def _half(h):
        """The float32 value of the fp16 bit pattern h (finite values; exact)."""
        e = (h >> 10) & 31
        mant = h & 1023
        if e != 0:
            mant += 1024
        v = np.float32(mant) * _POW2[e]
        return -v if h & 0x8000 else v

    # Codes out of a word w of four (`words`), read as int32: numba widens integer arithmetic to 64 bits,
    # so each step is narrowed back to int32 (LLVM then keeps 16 lanes a vector; 1.7x faster measured)
    @_njit(inline="always")
    def _nib(w, shift):
        """The 4-bit code at bit `shift` of w, as float32 (exact)."""
        return np.float32(np.int32(np.int32(w >> shift) & np.int32(15)))

    @_njit(inline="always")
    def _code(w, shift):
        """The int8 code at bit `shift` of w (sign-extended), as float32 (exact)."""
        return np.float32(np.int32(np.int32(w << (24 - shift)) >> 24))

    # Reductions need reassociation to vectorise (fastmath); nothing here relies on inf/nan semantics.
    _FM = {"reassoc", "contract", "nsz"}

    # The matmuls keep every inner loop a flat loop over a row: LLVM fully unrolls a constant 16- or
    # 32-step loop before its loop vectoriser runs, and the straight-line code left is not vectorised.
    # So a block's scale is spread over its inputs first (`e`, slice stores), and the row's dot product
    # is one loop.

    @_njit(fastmath=_FM)
    def _q4_1_mm(qs, dm, x, y):
        """y [M, n] = x [M, k] W^T; qs [n, k/2] uint8, dm [n, 2 k/32] float32 (d, m per block, from fp16)."""
        M, k = x.shape
        n = qs.shape[0]
        nb, h = k // 32, k // 2
        # input u of a row's byte stream pairs with x_lo[u] (low nibble) and x_hi[u] (high nibble)
        xl = np.empty((M, h), dtype=np.float32)
        xh = np.empty((M, h), dtype=np.float32)
        sx = np.empty((M, nb), dtype=np.float32)
        for r in range(M):
            for b in range(nb):
                xl[r, 16 * b:16 * b + 16] = x[r, 32 * b:32 * b + 16]
                xh[r, 16 * b:16 * b + 16] = x[r, 32 * b + 16:32 * b + 32]
                sx[r, b] = np.sum(x[r, 32 * b:32 * b + 32])
        e = np.empty(h, dtype=np.float32)
        for i in range(n):
            row = qs[i]
            dmi = dm[i]
            for b in range(nb):
                e[16 * b:16 * b + 16] = dmi[2 * b]
            for r in range(M):
                xlr = xl[r]
                xhr = xh[r]
                macc = np.float32(0.0)
                for b in range(nb):  # the offsets: m sum(x_b) per block
                    macc += dmi[2 * b + 1] * sx[r, b]
                acc = np.float32(0.0)
                for u in range(h):
                    f = np.float32(row[u])
                    hi = np.floor(f * np.float32(0.0625))  # the nibbles, exactly, without integer ops
                    lo = f - np.float32(16.0) * hi
                    acc += e[u] * (xlr[u] * lo + xhr[u] * hi)
                y[r, i] = acc + macc

    @_njit(fastmath=_FM)
    def _q8_0_mm(qs, d, x, y):
        """y [M, n] = x [M, k] W^T; qs [n, k] int8, d [n, k/32] float32 (from fp16)."""
        M, k = x.shape
        n = qs.shape[0]
        nb = k // 32
        e = np.empty(k, dtype=np.float32)
        for i in range(n):
            row = qs[i]
            di = d[i]
            for b in range(nb):
                e[32 * b:32 * b + 32] = di[b]
            for r in range(M):
                xr = x[r]
                acc = np.float32(0.0)
                for j in range(k):
                    acc += xr[j] * (e[j] * np.float32(row[j]))
                y[r, i] = acc

    # Decoding (one input row) on weights repacked block-major and row-minor (`repack_q4_1`, `repack_group`):
    # byte j of block b of all rows is contiguous, so the innermost loop runs over output rows with x_j
    # broadcast, each row's scale is applied once per block, and no loop needs a horizontal reduction.
    # Rows go in tiles whose partial sums T stay in L1.
    _TILE = 2048

    _MIN_TILE = 64  # rows per tile at least: short tiles spend more on their set-up than on the rows
    # Codes below this many bytes are one thread's work: waking the pool costs tens of microseconds (much
    # more when the other core is busy), against ~250 us to stream 4 MB. On SmolLM2-135M every layer's
    # matrices (<= 0.9 MB) stayed on one thread and only the output layer (28 MB) is split; with all 121
    # matrices a token split, 2 threads decoded at 35 tok/s against 95 on one (shared 2-core machine).
    _PARALLEL_BYTES = 1 << 22

    @_njit(inline="always")
    def _prefetch_row(a, per_line):
        """Prefetch every cache line (64 bytes: `per_line` elements) of the 1-D array a.

        Decoding streams each weight once from memory; the hardware prefetchers alone kept only a few
        lines in flight against the kernels' arithmetic (SmolLM2-135M's 30 layers of Q4_1: 8.5-10 ms a
        token with cold caches against 2.3 ms hot). Requesting the next block while computing this one
        brought that to ~6 ms."""
        for c in range(0, a.shape[0], per_line):
            _prefetch(a, c)

    def _scales(src, dst):  # pragma: no cover - compiled through the overload below
        """dst [L] float32 = src [L]: float32 as is, or fp16 bit patterns (uint16) converted exactly."""

    @_overload(_scales, inline="always")
    def _scales_impl(src, dst):
        if src.dtype == _types.uint16:
            def from_half(src, dst):
                # fp16 -> fp32 without a branch or a table: the sign and the 15 other bits moved to fp32's
                # places give the value times 2^-112 (a subnormal fp16 lands on an fp32 subnormal), and
                # times 2^112 is exact (IEEE arithmetic; nothing here flushes subnormals)
                u = dst.view(np.uint32)
                for r in range(src.shape[0]):
                    h = np.uint32(src[r])
                    u[r] = ((h & np.uint32(0x8000)) << np.uint32(16)) | ((h & np.uint32(0x7FFF)) << np.uint32(13))
                for r in range(src.shape[0]):
                    dst[r] *= np.float32(2.0 ** 112)
            return from_half

        def as_is(src, dst):
            for r in range(src.shape[0]):
                dst[r] = src[r]
        return as_is

    @_njit(inline="always")
    def _tile(n, nt):
        """Rows per tile: at most _TILE (partial sums in L1), and few enough that each of `nt` threads gets
        one (`nt` is an argument: numba.get_num_threads() in compiled code would stop it being cached)."""
        per = -(-n // nt)
        return max(_MIN_TILE, min(_TILE, -(-per // 16) * 16))

    @_njit(fastmath=_FM)
    def _q4_1_tile(qt, d, m, x, y, r0, L):
        """Rows r0 .. r0 + L - 1 of `_q4_1_mv_t` (one thread's tile)."""
        nb = qt.shape[0]
        qi = qt.view(np.int32)
        T = np.empty(L, dtype=np.float32)
        db = np.empty(L, dtype=np.float32)  # block b's scales and offsets of the tile's rows, as float32
        mb = np.empty(L, dtype=np.float32)
        per = 64 // d.itemsize  # scales per cache line
        for r in range(L):
            y[r0 + r] = 0.0
        for b in range(nb):
            for r in range(L):
                T[r] = 0.0
            bn = min(b + 1, nb - 1)  # the next block's words, requested while this one computes
            for s in range(4):  # word s of a row: bytes 4s .. 4s + 3, inputs 4s + i (low nibble), 4s + 16 + i
                c = 32 * b + 4 * s
                l0, l1, l2, l3 = x[c], x[c + 1], x[c + 2], x[c + 3]
                h0, h1, h2, h3 = x[c + 16], x[c + 17], x[c + 18], x[c + 19]
                q = qi[b, s, r0:r0 + L]
                _prefetch_row(qt[bn, s, r0:r0 + L], 16)
                for r in range(L):
                    w = q[r]
                    T[r] += ((l0 * _nib(w, 0) + h0 * _nib(w, 4)) + (l1 * _nib(w, 8) + h1 * _nib(w, 12))) \
                        + ((l2 * _nib(w, 16) + h2 * _nib(w, 20)) + (l3 * _nib(w, 24) + h3 * _nib(w, 28)))
            _prefetch_row(d[bn, r0:r0 + L], per)
            _prefetch_row(m[bn, r0:r0 + L], per)
            sxb = np.sum(x[32 * b:32 * b + 32])
            _scales(d[b, r0:r0 + L], db)
            _scales(m[b, r0:r0 + L], mb)
            for r in range(L):
                y[r0 + r] += db[r] * T[r] + mb[r] * sxb

    @_njit(fastmath=_FM, parallel=True, inline="always")
    def _q4_1_mv_t(qt, d, m, x, y, nt):
        """y [n] = W x [k]; qt [k/32, 4, n] uint32 (Q4_1 bytes in `words`), d, m [k/32, n] float32 or fp16."""
        n = qt.shape[2]
        nt = nt if qt.size >= _PARALLEL_BYTES else 1
        tile = _tile(n, nt)
        tiles = (n + tile - 1) // tile
        if nt == 1:  # no pool: waking its threads costs more than one core's rows
            for t in range(tiles):
                _q4_1_tile(qt, d, m, x, y, t * tile, min(n - t * tile, tile))
        else:
            for t in prange(tiles):  # row tiles over the threads
                _q4_1_tile(qt, d, m, x, y, t * tile, min(n - t * tile, tile))

    @_njit(fastmath=_FM)
    def _qg_mm(qs, d, m, x, y):
        """y [M, n] = x [M, k] W^T for w = d q + m per group of g = k / d.shape[1] inputs (GGUF's Q5_0,
        Q5_1, Q5_K, Q6_K, Q8_0 unpacked by lmlab/nn/quant_formats.py): qs [n, k] int8, d [n, k/g]
        float32, m [n, k/g] float32 or [n, 0] (no offsets). d q is exact, so this is dot(x, w) up to the
        order of fp32 sums; the offsets go in as m sum(x_group)."""
        M, k = x.shape
        n, nb = d.shape
        g = k // nb
        has_m = m.shape[1] > 0
        sx = np.zeros((M, nb), dtype=np.float32)
        if has_m:
            for r in range(M):
                for b in range(nb):
                    sx[r, b] = np.sum(x[r, g * b:g * b + g])
        e = np.empty(k, dtype=np.float32)
        for i in range(n):
            row = qs[i]
            di = d[i]
            for b in range(nb):
                e[g * b:g * b + g] = di[b]
            for r in range(M):
                xr = x[r]
                acc = np.float32(0.0)
                for j in range(k):
                    acc += xr[j] * (e[j] * np.float32(row[j]))
                if has_m:
                    mi = m[i]
                    for b in range(nb):
                        acc += mi[b] * sx[r, b]
                y[r, i] = acc

    @_njit(fastmath=_FM)
    def _qg_tile(qt, d, m, x, y, r0, L):
        """Rows r0 .. r0 + L - 1 of `_qg_mv_t` (one thread's tile)."""
        nb, g = qt.shape[0], 4 * qt.shape[1]
        qi = qt.view(np.int32)
        has_m = m.shape[0] > 0
        T = np.empty(L, dtype=np.float32)
        db = np.empty(L, dtype=np.float32)  # block b's scales and offsets of the tile's rows, as float32
        mb = np.empty(L, dtype=np.float32)
        per = 64 // d.itemsize  # scales per cache line
        for r in range(L):
            y[r0 + r] = 0.0
        for b in range(nb):
            for r in range(L):
                T[r] = 0.0
            bn = min(b + 1, nb - 1)  # the next block's words, requested while this one computes
            for s in range(g // 4):  # word s of a row: its codes 4s .. 4s + 3 of the group
                c = g * b + 4 * s
                x0, x1, x2, x3 = x[c], x[c + 1], x[c + 2], x[c + 3]
                q = qi[b, s, r0:r0 + L]
                _prefetch_row(qt[bn, s, r0:r0 + L], 16)
                for r in range(L):
                    w = q[r]
                    T[r] += (x0 * _code(w, 0) + x1 * _code(w, 8)) + (x2 * _code(w, 16) + x3 * _code(w, 24))
            _prefetch_row(d[bn, r0:r0 + L], per)
            if has_m:
                _prefetch_row(m[bn, r0:r0 + L], per)
            _scales(d[b, r0:r0 + L], db)
            if has_m:
                sxb = np.sum(x[g * b:g * b + g])
                _scales(m[b, r0:r0 + L], mb)
                for r in range(L):
                    y[r0 + r] += db[r] * T[r] + mb[r] * sxb
            else:
                for r in range(L):
                    y[r0 + r] += db[r] * T[r]

    @_njit(fastmath=_FM, parallel=True, inline="always")
    def _qg_mv_t(qt, d, m, x, y, nt):
        """`_qg_mm` for one input row on weights repacked block-major (`repack_group`): y [n] = W x [k];
        qt [k/g, g/4, n] uint32 (int8 codes in `words`), d [k/g, n], m [k/g, n] or [0, n]."""
        n = qt.shape[2]
        nt = nt if qt.size >= _PARALLEL_BYTES else 1
        tile = _tile(n, nt)
        tiles = (n + tile - 1) // tile
        if nt == 1:  # no pool: waking its threads costs more than one core's rows
            for t in range(tiles):
                _qg_tile(qt, d, m, x, y, t * tile, min(n - t * tile, tile))
        else:
            for t in prange(tiles):  # row tiles over the threads
                _qg_tile(qt, d, m, x, y, t * tile, min(n - t * tile, tile))

    @_njit(fastmath=_FM)
    def _q4_1_dequant(qs, dm, out):
        """out [n, k] = d q + m (one rounding: d q is exact); dm [n, 2 k/32] fp16 bit patterns."""
        n, k = out.shape
        nb, h = k // 32, k // 2
        ed = np.empty(h, dtype=np.float32)
        em = np.empty(h, dtype=np.float32)
        wl = np.empty(h, dtype=np.float32)
        wh = np.empty(h, dtype=np.float32)
        for i in range(n):
            row = qs[i]
            for b in range(nb):
                ed[16 * b:16 * b + 16] = _half(dm[i, 2 * b])
                em[16 * b:16 * b + 16] = _half(dm[i, 2 * b + 1])
            for u in range(h):
                f = np.float32(row[u])
                hi = np.floor(f * np.float32(0.0625))
                wl[u] = ed[u] * (f - np.float32(16.0) * hi) + em[u]
                wh[u] = ed[u] * hi + em[u]
            for b in range(nb):
                out[i, 32 * b:32 * b + 16] = wl[16 * b:16 * b + 16]
                out[i, 32 * b + 16:32 * b + 32] = wh[16 * b:16 * b + 16]

    @_njit(fastmath=_FM)
    def _dequant_t(kind, qt, d, m, c0, out):
        """out [k, L] = W^T for rows c0 .. c0 + L - 1 of block-major codes (`linear_args`' layout, `words`):
        kind 0 Q4_1 bytes, else int8 group codes, qt [k/g, g/4 words, n] uint32 (g = 32 for Q4_1; m [0, n]:
        no offsets); d, m [k/g, n] float32 or fp16 bit patterns. Each weight d q + m rounds once (d q is
        exact), as in `dequantized_weight`; the inner loops run along rows, vectorised."""
        L = out.shape[1]
        nb, nw = qt.shape[0], qt.shape[1]
        qi = qt.view(np.int32)
        g = 32 if kind == 0 else 4 * nw
        db = np.empty(L, dtype=np.float32)
        mb = np.zeros(L, dtype=np.float32)
        for b in range(nb):
            _scales(d[b, c0:c0 + L], db)
            if m.shape[0] > 0:
                _scales(m[b, c0:c0 + L], mb)
            for s in range(nw):
                q = qi[b, s, c0:c0 + L]
                for i in range(4):
                    if kind == 0:  # byte i of word s: inputs 4s + i (low nibble) and 4s + 16 + i (high)
                        lo = out[32 * b + 4 * s + i]
                        hi = out[32 * b + 16 + 4 * s + i]
                        for r in range(L):
                            lo[r] = db[r] * _nib(q[r], 8 * i) + mb[r]
                            hi[r] = db[r] * _nib(q[r], 8 * i + 4) + mb[r]
                    else:
                        o = out[g * b + 4 * s + i]
                        for r in range(L):
                            o[r] = db[r] * _code(q[r], 8 * i) + mb[r]

    @_njit(fastmath=_FM)
    def _dequant_t_any(kind, qt, s1, s2, c0, out):
        """`_dequant_t` on `linear_args`' scale bytes (fp16 where kind >= HALF)."""
        base = kind - HALF if kind >= HALF else kind
        if base == 0 and kind >= HALF:
            _dequant_t(0, qt, s1.view(np.uint16), s2.view(np.uint16), c0, out)
        elif base == 0:
            _dequant_t(0, qt, s1.view(np.float32), s2.view(np.float32), c0, out)
        elif base == 1 and kind >= HALF:  # Q8_0: no offsets
            _dequant_t(1, qt, s1.view(np.uint16), s2.view(np.uint16)[:0], c0, out)
        elif base == 1:
            _dequant_t(1, qt, s1.view(np.float32), s2.view(np.float32)[:0], c0, out)
        elif kind >= HALF:
            _dequant_t(2, qt, s1.view(np.uint16), s2.view(np.uint16), c0, out)
        else:
            _dequant_t(2, qt, s1.view(np.float32), s2.view(np.float32), c0, out)

    @_njit(fastmath=_FM)
    def _q8_0_dequant(qs, d, out):
        n, k = out.shape
        e = np.empty(k, dtype=np.float32)
        for i in range(n):
            row = qs[i]
            o = out[i]
            for b in range(k // 32):
                e[32 * b:32 * b + 32] = _half(d[i, b])
            for j in range(k):
                o[j] = e[j] * np.float32(row[j])

    @_njit(fastmath=_FM)
    def _rms_norm(x, w, y, eps):
        """RMSNorm (Zhang & Sennrich 2019) of the rows of x [M, k]: y = x / sqrt(mean(x^2) + eps) * w."""
        M, k = x.shape
        for r in range(M):
            s = np.float32(0.0)
            for j in range(k):
                s += x[r, j] * x[r, j]
            inv = np.float32(1.0) / np.sqrt(s / np.float32(k) + eps)
            for j in range(k):
                y[r, j] = x[r, j] * inv * w[j]

    def _row(src, buf):  # pragma: no cover - compiled through the overload below
        """A cache row src [hd] as float32: itself, or fp16 bit patterns (uint16) converted into buf."""

    @_overload(_row, inline="always")
    def _row_impl(src, buf):
        if src.dtype == _types.uint16:
            def converted(src, buf):
                _scales(src, buf)
                return buf
            return converted
        return lambda src, buf: src

    def _put(src, dst):  # pragma: no cover - compiled through the overload below
        """dst [L] = src [L] (float32, contiguous): as is, or rounded to fp16 bit patterns (uint16)."""

    @_overload(_put, inline="always")
    def _put_impl(src, dst):
        if dst.dtype == _types.uint16:
            def to_half(src, dst):
                # IEEE round-to-nearest-even, as torch's .half() (and C's (_Float16) casts) round: a normal
                # result adds 0xFFF plus the kept mantissa's lowest bit before dropping 13 bits (a carry
                # moves into the exponent, up to inf past 65504); below 2^-14 the result is subnormal, a
                # multiple of 2^-24, and rint rounds half to even
                bits = src.view(np.uint32)
                for j in range(src.shape[0]):
                    f = bits[j]
                    a = f & np.uint32(0x7FFFFFFF)
                    o = (a - np.uint32(112 << 23) + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) \
                        >> np.uint32(13)
                    if a < np.uint32(0x38800000):
                        o = np.uint32(np.rint(abs(src[j]) * np.float32(2.0 ** 24)))
                    if a >= np.uint32(0x47800000):  # |x| >= 2^16 (or inf, nan)
                        o = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else np.uint32(0x7C00)
                    dst[j] = np.uint16(((f >> np.uint32(16)) & np.uint32(0x8000)) | o)
            return to_half
        return lambda src, dst: _scales(src, dst)  # a float32 copy

    @_njit(fastmath=_FM)
    def _attend(q, k, v, S, y, sc, scale):
        """One query per head over the first S positions of a key/value cache, grouped-query (head h reads
        key/value head h // (nh // nkv)): q [nh, hd], k and v [nkv, >= S, hd] (any strides; float32, or fp16
        bit patterns as uint16, converted exactly a row at a time), y [nh, hd] = softmax(scale q k^T) v;
        sc: scratch of at least (nh // nkv) * S floats. Each key/value row is read once for its group of
        query heads."""
        nh, hd = q.shape
        g = nh // k.shape[0]
        buf = np.empty(hd, dtype=np.float32)
        inv = np.empty(g, dtype=np.float32)
        for kh in range(k.shape[0]):
            h0 = kh * g
            for s in range(S):
                kr = _row(k[kh, s], buf)
                for i in range(g):
                    a = np.float32(0.0)
                    for c in range(hd):
                        a += q[h0 + i, c] * kr[c]
                    sc[i * S + s] = a * scale
            for i in range(g):
                mx = np.float32(-np.inf)
                for s in range(S):
                    mx = max(mx, sc[i * S + s])
                tot = np.float32(0.0)
                for s in range(S):
                    e = np.exp(sc[i * S + s] - mx)
                    sc[i * S + s] = e
                    tot += e
                inv[i] = np.float32(1.0) / tot
                for c in range(hd):
                    y[h0 + i, c] = 0.0
            for s in range(S):
                vr = _row(v[kh, s], buf)
                for i in range(g):
                    p = sc[i * S + s]
                    for c in range(hd):
                        y[h0 + i, c] += p * vr[c]
            for i in range(g):
                for c in range(hd):
                    y[h0 + i, c] *= inv[i]

    @_njit(fastmath=_FM)
    def _attention(q, k, v, y, sc, scale):
        """`_attend` for each batch row: q [B, nh, hd], k and v [B, nkv, S, hd], y [B, nh, hd]."""
        for b in range(q.shape[0]):
            _attend(q[b], k[b], v[b], k.shape[2], y[b], sc, scale)

    @_njit(fastmath=_FM)
    def _rope_store(heads, cos, sin, nq, nkv, kdst, vdst):
        """One decoding position of a fused q/k/v projection, heads [nq + 2 nkv, hd]: rotate the query and
        key heads in place, store the key heads to kdst [nkv, hd] and the value heads to vdst [nkv, hd]
        (float32, or fp16 bit patterns as uint16: rounded to nearest even). RoPE, half-split layout:
        out = x cos + roll(x, hd/2) sin, sin's first half negated (lmlab/nn/position.py)."""
        hd = heads.shape[1]
        half = hd // 2
        for h in range(nq + nkv):
            for j in range(half):
                a = heads[h, j]
                b = heads[h, j + half]
                heads[h, j] = a * cos[j] - b * sin[j]
                heads[h, j + half] = b * cos[j + half] + a * sin[j + half]
        for h in range(nkv):
            _put(heads[nq + h], kdst[h])
            _put(heads[nq + nkv + h], vdst[h])

    @_njit(fastmath=_FM, parallel=True, inline="always")
    def _linear(kind, qt, s1, s2, x, y, nt):
        """One linear of `linear_args`: its scales s1, s2 arrive as bytes, fp16 where kind % PLANES >= HALF;
        on int8 activations (`PLANES`) on this thread."""
        if kind >= PLANES:
            _rows(kind, qt, s1, s2, x[0], y[0], 0, y.shape[1])
        elif kind >= HALF:
            _linear_typed(kind - HALF, qt, s1.view(np.uint16), s2.view(np.uint16), x, y, nt)
        else:
            _linear_typed(kind, qt, s1.view(np.float32), s2.view(np.float32), x, y, nt)

    @_njit(fastmath=_FM, parallel=True, inline="always")
    def _linear_typed(kind, qt, s1, s2, x, y, nt):
        if kind == 0:
            _q4_1_mv_t(qt, s1, s2, x[0], y[0], nt)
        elif kind == 1:
            _qg_mv_t(qt, s1, s2[:0], x[0], y[0], nt)  # Q8_0: groups of 32, no offsets
        else:
            _qg_mv_t(qt, s1, s2, x[0], y[0], nt)

    # parallel: the decoding kernels' row tiles (inlined, so that the compiled function can be cached)
    @_njit(fastmath=_FM, parallel=True)
    def _decode_layer(x, h, o, qkv, att, gu, act, scratch, n1, n2, eps1, eps2,
                      k_qkv, qs_qkv, s1_qkv, s2_qkv, k_o, qs_o, s1_o, s2_o, k_up, qs_up, s1_up, s2_up,
                      k_down, qs_down, s1_down, s2_down, b_qkv,
                      cos, sin, kc, vc, pos, nh, nkv, scale, nt):
        """One pre-RMSNorm Llama block for one token, in place on x [1, n_embd]: attention (fused qkv,
        RoPE, the cache kc / vc [nkv, max_len, hd] written at pos) and a SwiGLU MLP (fused gate/up)."""
        hd = kc.shape[2]
        _rms_norm(x, n1, h, eps1)
        _linear(k_qkv, qs_qkv, s1_qkv, s2_qkv, h, qkv, nt)
        for j in range(b_qkv.shape[0]):  # q/k/v biases (Qwen2); none: an empty array
            qkv[0, j] += b_qkv[j]
        heads = qkv.reshape((nh + 2 * nkv, hd))
        _rope_store(heads, cos, sin, nh, nkv, kc[:, pos], vc[:, pos])
        _attend(heads[:nh], kc, vc, pos + 1, att.reshape((nh, hd)), scratch, scale)
        _linear(k_o, qs_o, s1_o, s2_o, att, o, nt)
        for j in range(x.shape[1]):
            x[0, j] += o[0, j]
        _rms_norm(x, n2, h, eps2)
        _linear(k_up, qs_up, s1_up, s2_up, h, gu, nt)
        hidden = act.shape[1]
        for j in range(hidden):
            a = gu[0, j]
            act[0, j] = a / (np.float32(1.0) + np.exp(-a)) * gu[0, hidden + j]
        _linear(k_down, qs_down, s1_down, s2_down, act, o, nt)
        for j in range(x.shape[1]):
            x[0, j] += o[0, j]


    # -----------------------------------------------------------------------------------------
    # Decoding one token on several threads with one wake-up per token (lmlab/generate/fast_decode.py
    # `_Team`): each thread runs every layer on its share of each matrix's rows, and the threads
    # meet at a barrier (spinning on counters in shared memory) wherever a step reads what the others
    # wrote: ~5 barriers per layer, each well under a microsecond when both threads are running, against
    # tens of microseconds to wake a pool's threads for each of a token's ~120 matrices.

    @_intrinsic
    def _load_acquire(typingctx, arr, i):
        """arr[i] (1-D int64) read atomically, acquire ordering: what its writer wrote before it is visible."""
        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = _cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]], wraparound=False,
                                            boundscheck=False)
            return builder.load_atomic(ptr, "acquire", 8)
        return _types.int64(arr, i), codegen

    @_intrinsic
    def _store_release(typingctx, arr, i, v):
        """arr[i] = v (1-D int64) written atomically, release ordering (after everything written before)."""
        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = _cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]], wraparound=False,
                                            boundscheck=False)
            builder.store_atomic(context.cast(builder, args[2], sig.args[2], _types.int64), ptr, "release", 8)
            return context.get_dummy_value()
        return _types.void(arr, i, v), codegen

    @_intrinsic
    def _yield_cpu(typingctx):
        """sched_yield(2): hand this core to another runnable thread, perhaps the one being waited for."""
        def codegen(context, builder, sig, args):
            fn = _cgutils.get_or_insert_function(builder.module, _ir.FunctionType(_ir.IntType(32), []),
                                                 "sched_yield")
            builder.call(fn, [])
            return context.get_dummy_value()
        return _types.void(), codegen

    SPLIT_LINE = 16  # int64s per thread's counter: each on its own 128 bytes (two cache lines)
    # Spins at a barrier before each further check yields the core: while every thread has a core a wait
    # ends within microseconds; on a busy machine the awaited thread may be queued behind this one
    SPIN = 2000

    @_njit
    def _barrier(flags, t, nt, count):
        """Thread t of nt arrives at barrier number count + 1 and waits until every thread has; returns that
        number, or -1 if a thread gave up (flags[SPLIT_LINE * nt] != 0, set by lmlab/generate/fast_decode.py)."""
        count += 1
        _store_release(flags, SPLIT_LINE * t, count)
        spins = 0
        for u in range(nt):
            while u != t and _load_acquire(flags, SPLIT_LINE * u) < count:
                if _load_acquire(flags, SPLIT_LINE * nt) != 0:
                    return -1
                spins += 1
                if spins > SPIN:
                    _yield_cpu()
        return count

    @_njit(inline="always")
    def _share(n, t, nt, align):
        """Thread t's rows [a, b) of n, split into nt parts of whole multiples of `align`."""
        per = -(-n // nt)
        per = -(-per // align) * align
        a = min(n, t * per)
        return a, min(n, a + per)

    @_njit(fastmath=_FM)
    def _rows_typed(kind, qt, s1, s2, x, y, a, b, planes):
        r = a
        if planes > 0 and kind == 0:
            r = _qint.rows_int(qt, s1, s2, x, y, a, b, planes, True, 32)
        elif planes > 0 and kind == 2 and s2.shape[0] > 0:
            r = _qint.rows_int(qt.view(np.int32), s1, s2, x, y, a, b, planes, True, 4 * qt.shape[1])
        elif planes > 0:  # no offsets (Q8_0, or groups without them): s1 stands in for them, times 0
            r = _qint.rows_int(qt.view(np.int32), s1, s1, x, y, a, b, planes, False, 4 * qt.shape[1])
        while r < b:
            L = min(_TILE, b - r)
            if kind == 0:
                _q4_1_tile(qt, s1, s2, x, y, r, L)
            elif kind == 1:
                _qg_tile(qt, s1, s2[:0], x, y, r, L)
            else:
                _qg_tile(qt, s1, s2, x, y, r, L)
            r += L

    @_njit(fastmath=_FM)
    def _rows(kind, qt, s1, s2, x, y, a, b):
        """Rows [a, b) of y [n] = W x for one linear of `linear_args`, on this thread."""
        planes, kind = kind // PLANES, kind % PLANES
        if kind >= HALF:
            _rows_typed(kind - HALF, qt, s1.view(np.uint16), s2.view(np.uint16), x, y, a, b, planes)
        else:
            _rows_typed(kind, qt, s1.view(np.float32), s2.view(np.float32), x, y, a, b, planes)

    @_njit(fastmath=_FM)
    def _rows_residual(kind, qt, s1, s2, inp, o, x, t, nt):
        """Thread t's rows of o = W inp [1, k], added to the residual stream x [1, n] (its rows only)."""
        a, b = _share(x.shape[1], t, nt, 16)
        _rows(kind, qt, s1, s2, inp[0], o[0], a, b)
        for j in range(a, b):
            x[0, j] += o[0, j]

    @_njit(fastmath=_FM)
    def _decode_layer_split(t, nt, flags, count, x, h, o, qkv, att, gu, act, scratch, n1, n2, eps1, eps2,
                            k_qkv, qs_qkv, s1_qkv, s2_qkv, k_o, qs_o, s1_o, s2_o, k_up, qs_up, s1_up, s2_up,
                            k_down, qs_down, s1_down, s2_down, b_qkv, cos, sin, kc, vc, pos, nh, nkv, scale):
        """Thread t's part of `_decode_layer`: x, o, qkv, att, gu, act are shared, h and scratch its own.
        q/k/v rows go by whole heads, so each thread rotates and stores the heads it computed."""
        hd = kc.shape[2]
        _rms_norm(x, n1, h, eps1)  # every thread, into its own h
        a, b = _share(qkv.shape[1], t, nt, hd)
        _rows(k_qkv, qs_qkv, s1_qkv, s2_qkv, h[0], qkv[0], a, b)
        for j in range(a, min(b, b_qkv.shape[0])):
            qkv[0, j] += b_qkv[j]
        heads = qkv.reshape((nh + 2 * nkv, hd))
        half = hd // 2
        for hh in range(a // hd, b // hd):
            if hh < nh + nkv:  # RoPE on query and key heads
                for j in range(half):
                    u = heads[hh, j]
                    w = heads[hh, j + half]
                    heads[hh, j] = u * cos[j] - w * sin[j]
                    heads[hh, j + half] = w * cos[j + half] + u * sin[j + half]
            if hh >= nh + nkv:
                _put(heads[hh], vc[hh - nh - nkv, pos])
            elif hh >= nh:
                _put(heads[hh], kc[hh - nh, pos])
        count = _barrier(flags, t, nt, count)
        if count < 0:
            return count
        g = nh // nkv  # attention by key/value heads (each with its g query heads)
        ka, kb = _share(nkv, t, nt, 1)
        if kb > ka:
            _attend(heads[ka * g:kb * g], kc[ka:kb], vc[ka:kb], pos + 1, att.reshape((nh, hd))[ka * g:kb * g],
                    scratch, scale)
        count = _barrier(flags, t, nt, count)
        if count < 0:
            return count
        _rows_residual(k_o, qs_o, s1_o, s2_o, att, o, x, t, nt)
        count = _barrier(flags, t, nt, count)
        if count < 0:
            return count
        _rms_norm(x, n2, h, eps2)
        hidden = act.shape[1]
        a, b = _share(hidden, t, nt, 16)  # gate rows [a, b) and their up rows: this thread's activations
        _rows(k_up, qs_up, s1_up, s2_up, h[0], gu[0], a, b)
        _rows(k_up, qs_up, s1_up, s2_up, h[0], gu[0], hidden + a, hidden + b)
        for j in range(a, b):
            u = gu[0, j]
            act[0, j] = u / (np.float32(1.0) + np.exp(-u)) * gu[0, hidden + j]
        count = _barrier(flags, t, nt, count)
        if count < 0:
            return count
        _rows_residual(k_down, qs_down, s1_down, s2_down, act, o, x, t, nt)
        return _barrier(flags, t, nt, count)

    @_njit(fastmath=_FM)
    def _decode_token_split(t, nt, flags, count, layers, cos, sin, kc, vc, pos, nh, nkv, scale,
                            norm, eps, kind, qt, s1, s2, logits):
        """Thread t's share of one token: every layer of `layers` (a typed list of `_decode_layer_split`'s
        per-layer arguments, this thread's h and scratch in them), then the output layer."""
        for i in range(len(layers)):
            (x, h, o, qkv, att, gu, act, scratch, n1, n2, eps1, eps2, k_qkv, qs_qkv, s1_qkv, s2_qkv, k_o, qs_o,
             s1_o, s2_o, k_up, qs_up, s1_up, s2_up, k_down, qs_down, s1_down, s2_down, b_qkv) = layers[i]
            count = _decode_layer_split(t, nt, flags, count, x, h, o, qkv, att, gu, act, scratch, n1, n2, eps1,
                                        eps2, k_qkv, qs_qkv, s1_qkv, s2_qkv, k_o, qs_o, s1_o, s2_o, k_up, qs_up,
                                        s1_up, s2_up, k_down, qs_down, s1_down, s2_down, b_qkv, cos, sin, kc[i],
                                        vc[i], pos, nh, nkv, scale)
            if count < 0:
                return count
        x, h = layers[0][0], layers[0][1]
        return _head_split(t, nt, flags, count, x, h, norm, eps, kind, qt, s1, s2, logits)

    @_njit(fastmath=_FM)
    def _head_split(t, nt, flags, count, x, h, norm, eps, kind, qt, s1, s2, logits):
        """Thread t's rows of the output layer after the final RMSNorm (into its own h)."""
        _rms_norm(x, norm, h, eps)
        a, b = _share(logits.shape[1], t, nt, 16)
        _rows(kind, qt, s1, s2, h[0], logits[0], a, b)
        return _barrier(flags, t, nt, count)


def set_threads(n: int) -> int:
    """Threads for the decoding kernels (at most numba's pool size); returns how many."""
    if numba is None:
        return 1
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def available() -> bool:
    """Whether the kernels run here (numba imports and `LMLAB_NO_KERNELS` is not set)."""
    return not os.environ.get("LMLAB_NO_KERNELS") and numba is not None


def _u16(t: torch.Tensor, cols: int) -> np.ndarray:
    """fp16 scales as their bit patterns, [rows, cols]."""
    return t.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1, cols)


_SCALES: dict[int, tuple] = {}  # id(fp16 scale tensor) -> (weakref to it, its version, float32 copy)


def _f32(t: torch.Tensor, cols: int) -> np.ndarray:
    """fp16 scales as float32 [rows, cols] (exact), converted once per tensor and kept while it lives."""
    hit = _SCALES.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    out = t.detach().float().contiguous().numpy().reshape(-1, cols)
    try:
        key = id(t)
        ref = weakref.ref(t, lambda _: _SCALES.pop(key, None))
    except TypeError:
        return out
    _SCALES[id(t)] = (ref, t._version, out)
    return out


def _scale_array(t: torch.Tensor) -> np.ndarray:
    """Scales [k/g, n] for the decoding kernels: fp16 ones as their bit patterns (uint16, converted exactly
    in the kernels: half the bytes to stream), anything else as float32."""
    t = t.contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.float16 else t.float().numpy()


def block_major(qs: torch.Tensor) -> bool:
    """Whether codes `qs` are stored as the decoding kernels read them (`to_block_major`): a [n, k'/4, 4]
    view of a contiguous [k'/4, n, 4] array."""
    return qs.dim() == 3 and qs.shape[2] == 4 and qs.shape[0] > 1 and qs.permute(1, 0, 2).is_contiguous()


def to_block_major(qs: torch.Tensor) -> torch.Tensor:
    """Codes `qs` [n, k'] (k' a multiple of 4) stored block-major in words of four (a copy): word s of all
    rows together, each row's four consecutive codes 4s .. 4s + 3 side by side. Returned as the [n, k'/4, 4]
    view (`block_major`); `flat_codes` gives [n, k'] back."""
    n = qs.shape[0]
    return qs.reshape(n, -1, 4).permute(1, 0, 2).contiguous().permute(1, 0, 2)


def flat_codes(qs: torch.Tensor) -> torch.Tensor:
    """Codes as [rows, k'] (a copy where they are stored block-major)."""
    return qs if qs.dim() == 2 else qs.reshape(qs.shape[0], -1)


def words(qs: torch.Tensor, nb: int) -> np.ndarray:
    """The decoding kernels' view of codes `qs` [n, k'] (a copy unless `block_major`): qt [nb, k'/(4 nb), n]
    uint32, word s of block b of row r holding its codes 4s .. 4s + 3 (byte i: code 4s + i). For Q4_1 a
    code is a byte of two nibbles (byte j: inputs j and j + 16 of the block); else an int8."""
    if not block_major(qs):
        qs = to_block_major(qs)
    n = qs.shape[0]
    return qs.permute(1, 0, 2).numpy().view(np.uint32).reshape(nb, -1, n)


def repack_q4_1(qs: torch.Tensor, dm: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 blocks (`qs` [n, k/2] uint8, `dm` [n, k/32, 2] fp16 or float32) as `_q4_1_mv_t` reads them: qt
    [k/32, 4, n] (`words`), d, m [k/32, n] (`_scale_array`: fp16 kept as uint16 bit patterns)."""
    nb = dm.shape[1]
    return words(qs, nb), _scale_array(dm[..., 0].T), _scale_array(dm[..., 1].T)


def repack_q8_0(qs: torch.Tensor, d: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 blocks (`qs` [n, k] int8, `d` [n, k/32] fp16) for `_qg_mv_t`: qt [k/32, 8, n] (`words`) and d
    [k/32, n] (`_scale_array`)."""
    return words(qs, d.shape[1]), _scale_array(d.T)


def repack_group(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> tuple[np.ndarray, ...]:
    """Group codes (`qs` [n, k] int8, `d`, `m` [n, k/g] float32) for `_qg_mv_t`: qt [k/g, g/4, n] (`words`),
    d and m [k/g, n] float32 (m [0, n] when there are no offsets)."""
    n, nb = d.shape
    mt = np.zeros((0, n), np.float32) if m is None else m.float().T.contiguous().numpy()
    return words(qs, nb), d.float().T.contiguous().numpy(), mt


def linear_args(qs: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None = None,
                group: bool = False) -> tuple:
    """(kind, qt, s1, s2) as `_decode_layer` takes a linear: Q4_1 (`qs` uint8) is kind 0 with (d, m), Q8_0
    (int8) kind 1 with d (s2 unused), other groups kind 2; qt the codes' `words` (a view where `qs` is
    `block_major`), scales copied by `repack_q4_1` / `repack_q8_0` / `repack_group`. The scales go as
    bytes [k/g, 4n] (float32) or [k/g, 2n] (fp16 bit patterns, kind + HALF), so every layout compiles
    to one `_decode_layer`."""
    if group:
        qt, d, m = repack_group(qs, scales, offsets)
        kind = 2
    elif qs.dtype == torch.uint8:
        qt, d, m = repack_q4_1(qs, scales)
        kind = 0
    else:
        qt, d = repack_q8_0(qs, scales)
        m, kind = d, 1
    if d.dtype != m.dtype:  # one of them fp16, the other not: both as float32
        d, m = (a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else a for a in (d, m))
    if d.dtype == np.uint16:
        kind += HALF
    return kind, qt, d.view(np.uint8), m.view(np.uint8)


def _rows_block_major(mv, x: torch.Tensor, qt: np.ndarray, d: np.ndarray, m: np.ndarray, n: int) -> torch.Tensor:
    """x [..., k] @ W^T, one row at a time through a block-major decoding kernel `mv` (few rows: each
    reads the weights once, without a row-major copy of them)."""
    x2 = x.contiguous().view(-1, x.shape[-1]).numpy()
    y = torch.empty(x2.shape[0], n)
    for r in range(x2.shape[0]):
        mv(qt, d, m, x2[r], y[r].numpy(), 1)
    return y.view(*x.shape[:-1], n)


_SCRATCH = threading.local()  # each thread's buffer for `block_major_mm`'s dequantized weights
# 4 MB: a SmolLM2 layer's largest matrix as `block_major_swiglu` makes it (576 x 1536, the gate or the up
# half) at once; more goes in chunks
SCRATCH_FLOATS = 1 << 20


def block_major_mm(x: torch.Tensor, args: tuple, start: int = 0, count: int | None = None, *,
                   swish: bool = False, times: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, k] float32 @ W^T -> [M, n] float32 for a linear in `linear_args`' block-major layout (or for
    its rows start .. start + count): W^T made a chunk of rows at a time in one reused per-thread buffer
    (no allocation per call, so prefill leaves no heap behind), then one fp32 GEMM per chunk. The
    weights are those of `dequantized_weight`. `swish`: silu of the result; `times`: the result times
    this [M, n] tensor (oneDNN post-ops of the GEMM, where it makes the matrix in one chunk)."""
    kind, qt, s1, s2 = args
    k = x.shape[1]
    n = qt.shape[2] - start if count is None else count
    chunk = max(64, min(n, SCRATCH_FLOATS // k))
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < k * chunk:
        buf = _SCRATCH.buf = torch.empty(max(k * chunk, SCRATCH_FLOATS))
    if chunk >= n:  # one chunk: the GEMM's own output is the result
        wt = buf[:k * n].view(k, n)
        _dequant_t_any(kind, qt, s1, s2, start, wt.numpy())
        return _gemm(x, wt, swish, times)
    y = x.new_empty(x.shape[0], n)
    for c0 in range(0, n, chunk):
        L = min(chunk, n - c0)
        wt = buf[:k * L].view(k, L)
        _dequant_t_any(kind, qt, s1, s2, start + c0, wt.numpy())
        y[:, c0:c0 + L] = _gemm(x, wt)
    if swish:
        F.silu(y, inplace=True)
    return y if times is None else y.mul_(times)


def block_major_swiglu(x: torch.Tensor, args: tuple) -> torch.Tensor:
    """silu(x Wg^T) * (x Wu^T) -> [M, n / 2] for a fused gate-and-up projection W = [Wg; Wu] (lmlab's MLP
    layout) in `linear_args`' block-major layout: two GEMMs, silu fused into the first and the product
    into the second, so neither the [M, n] projection nor silu's output is made, and each half's weights
    fit the scratch buffer in one piece (apart, silu and the product took 15 ms of a 260 ms SmolLM2
    prefill of 256 tokens at 2 threads, torch.profiler, besides their outputs' page faults)."""
    half = args[1].shape[2] // 2
    gate = block_major_mm(x, args, 0, half, swish=True)
    return block_major_mm(x, args, half, half, times=gate)


def _gemm(x: torch.Tensor, wt: torch.Tensor, swish: bool = False, times: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, k] @ wt [k, n] in float32 through oneDNN's GEMM where PyTorch has it (the op its compiler's
    CPU passes use for linear layers; strict fp32, no down-conversion unless the user has set
    `torch.backends.mkldnn.matmul.fp32_precision`), with silu (`swish`) or a product (`times`) applied to
    the result as oneDNN post-ops. `torch.mm` goes to MKL's sgemm, which on AMD CPUs runs a path without
    AVX-512: on this machine's EPYC, 113 GFLOP/s a core against oneDNN's 262 on SmolLM2's prefill shapes
    (256 x 576 x 1536), with the same fp32 rounding (max error 2^-21.6 of sum |x w| against MKL's
    2^-22.9, both summation order)."""
    if _ONEDNN:
        if times is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, times, wt.T, None, "mul")
        return torch.ops.mkldnn._linear_pointwise(x, wt.T, None, "swish" if swish else "none", [], "")
    y = torch.mm(x, wt)
    if swish:
        F.silu(y, inplace=True)
    return y if times is None else y.mul_(times)


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def q4_1_matmul(x: torch.Tensor, qs: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """x [..., k] (float32, contiguous) @ W^T -> [..., n] float32, W = d q + m in Q4_1 blocks (`qs` [n, k/2]
    uint8, `dm` [n, k/32, 2] float16)."""
    n = qs.shape[0]
    if block_major(qs):
        return _rows_block_major(_q4_1_mv_t, x, *repack_q4_1(qs, dm), n)
    k = qs.shape[1] * 2
    y = x.new_empty(*x.shape[:-1], n)
    _q4_1_mm(qs.contiguous().numpy(), _f32(dm, k // 16), x.contiguous().view(-1, k).numpy(), y.view(-1, n).numpy())
    return y


def q8_0_matmul(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x [..., k] (float32, contiguous) @ W^T -> [..., n] float32, W = d q in Q8_0 blocks (`qs` [n, k]
    int8, `d` [n, k/32] float16)."""
    if block_major(qs):
        qt, d = repack_q8_0(qs, d)
        return _rows_block_major(_qg_mv_t, x, qt, d, d[:0], qs.shape[0])
    n, k = qs.shape
    y = x.new_empty(*x.shape[:-1], n)
    _q8_0_mm(qs.contiguous().numpy(), _f32(d, k // 32), x.contiguous().view(-1, k).numpy(), y.view(-1, n).numpy())
    return y


def group_matmul(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """x [..., k] (float32, contiguous) @ W^T -> [..., n] float32, w = d q + m per group (`qs` [n, k] int8,
    `d`, `m` [n, k/g] float32; m None: no offsets)."""
    if block_major(qs):
        dt = _scale_array(d.T)
        mt = dt[:0] if m is None else _scale_array(m.T)
        if dt.dtype != mt.dtype:
            dt, mt = _scale_array(d.T.float()), _scale_array(m.T.float())
        return _rows_block_major(_qg_mv_t, x, words(qs, d.shape[1]), dt, mt, qs.shape[0])
    n, k = qs.shape
    y = x.new_empty(*x.shape[:-1], n)
    mm = np.zeros((n, 0), np.float32) if m is None else m.float().contiguous().numpy()
    _qg_mm(qs.contiguous().numpy(), d.float().contiguous().numpy(), mm, x.contiguous().view(-1, k).numpy(),
           y.view(-1, n).numpy())
    return y


def q4_1_dequantize(qs: torch.Tensor, dm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense [n, k] weight of Q4_1 blocks, in float32 or bfloat16 (rounded to nearest even)."""
    qs = flat_codes(qs)
    n, k = qs.shape[0], qs.shape[1] * 2
    if dm.dtype == torch.float32:  # K-quant scales (exact in fp32, not in fp16): vectorised in torch
        b = qs.reshape(n, -1, 16)
        q = torch.cat([b & 15, b >> 4], dim=-1).float()
        out = torch.addcmul(dm[..., 1:], dm[..., :1], q).reshape(n, k)
        return out if dtype == torch.float32 else out.to(dtype)
    out = torch.empty(n, k, dtype=torch.float32)
    _q4_1_dequant(qs.contiguous().numpy(), _u16(dm, k // 16), out.numpy())
    return out if dtype == torch.float32 else out.to(dtype)


def q8_0_dequantize(qs: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense [n, k] weight of Q8_0 blocks, in float32 or bfloat16 (rounded to nearest even)."""
    qs = flat_codes(qs)
    n, k = qs.shape
    out = torch.empty(n, k, dtype=torch.float32)
    _q8_0_dequant(qs.contiguous().numpy(), _u16(d, k // 32), out.numpy())
    return out if dtype == torch.float32 else out.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of a contiguous float32 x, with a float32 weight."""
    k = x.shape[-1]
    x = x.contiguous()
    y = torch.empty_like(x)
    _rms_norm(x.view(-1, k).numpy(), weight.contiguous().numpy(), y.view(-1, k).numpy(), np.float32(eps))
    return y


_CACHE_DTYPES = (torch.float32, torch.float16)


def cache_array(t: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a float32 or float16 KV-cache tensor as the kernels take it: fp16 as
    its bit patterns (uint16), since numba computes nothing in fp16 on CPU."""
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype != torch.float32:
        raise TypeError(f"KV cache kernels take float32 or float16, not {t.dtype}")
    return t.numpy()


def rope_store(heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nq: int, nkv: int,
               kdst: torch.Tensor, vdst: torch.Tensor) -> None:
    """One decoding position of a fused q/k/v projection, `heads` [nq + 2 nkv, hd] (contiguous): rotate the
    query and key heads in place, store the key heads to `kdst` [nkv, hd] and the value heads to `vdst`
    [nkv, hd] (views of a float32 or float16 cache, any strides). `cos`, `sin`: [hd] for the position
    (lmlab/nn/position.py)."""
    _rope_store(heads.numpy(), cos.contiguous().numpy(), sin.contiguous().numpy(), nq, nkv, cache_array(kdst),
                cache_array(vdst))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
         enable_gqa: bool = False) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, with the decoding case (one float32 query per head, no mask, no
    dropout; q [B, nh, 1, hd], k and v [B, nkv, S, hd], float32 or float16) in one kernel call: PyTorch's
    fused CPU kernel spends ~60-150 us there, several ms per token over 30 layers."""
    B, nh, T, hd = q.shape
    if T != 1 or attn_mask is not None or dropout_p or is_causal or q.dtype != torch.float32 \
            or k.dtype not in _CACHE_DTYPES or v.dtype != k.dtype or q.device.type != "cpu" \
            or k.shape[0] != B or k.shape != v.shape or nh % k.shape[1] or q.requires_grad:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    S = k.shape[2]
    y = q.new_empty(B, nh, 1, hd)
    sc = np.empty(nh // k.shape[1] * S, dtype=np.float32)
    _attention(q[:, :, 0].numpy(), cache_array(k.detach()), cache_array(v.detach()), y[:, :, 0].numpy(), sc,
               np.float32(hd ** -0.5 if scale is None else scale))
    return y
