"""Decoding with integer dot products: the activations quantized per block, the weights' integer codes
multiplied with them by AVX-512 VNNI (`vpdpbusd`: 64 u8 x s8 products summed in fours into 16 int32 lanes
per instruction), the block's scales applied in fp32 once per block.

Two precisions of the activations, per block of 32 (or 16) inputs with a float32 step dx:
- `planes=1` is llama.cpp's: x ~ dx v with v = round(x / dx) in [-127, 127] (ggml's `block_q8_1`,
  dx = max|x| / 127).
- `planes=2` (the default where VNNI exists): v = round(x / dx) in [-16256, 16256] with dx = max|x| / 16256,
  split exactly as v = 128 vh + vl with vh in [-127, 127] and vl in [-64, 64], two int8 planes; the dot
  products of both planes recombine exactly in int32 (128 dot(q, vh) + dot(q, vl)). Each activation is
  then off by at most 1/32512 of its block's largest, ~128x closer than one plane, for twice the
  multiply instructions (still ~4x fewer instructions than fp32 arithmetic on the unpacked codes).
Nothing else is approximated: the weights' codes and their fp16 scales are used exactly, each block's
integer sum is exact (|sum| < 2^24 for 4-bit codes, so also exact as a float), and the offsets' term
m dx sum(v) (Q4_1, K-quants' mins) takes the same rounded activations: each block's result is the exact
weights times the quantized activations.

The weights stay where decoding already keeps them (lmlab/nn/quant_kernels.py `words`: block-major,
row-minor, in words of four consecutive codes of a row), so this mode costs no memory, and that layout is
what VNNI wants: a 512-bit load of word s for 16 rows gives each 32-bit lane one row's four codes, to be
multiplied with four activations broadcast to every lane.
Q4_1 bytes hold inputs j (low nibble) and j + 16 (high) of a block; codes of other formats are int8, made unsigned
by flipping the top bit (q + 128), with 128 sum(v) taken off each block's sum.

The kernel is written directly in LLVM IR (numba `intrinsic`), as numba cannot express 512-bit integer
vectors; on a CPU without AVX-512 VNNI the same IR multiplies in generic vector code (exact, slower), and
lmlab/generate/fast_decode.py does not choose this mode by default there (`available()`).
"""

from __future__ import annotations

import os

import numpy as np

try:
    import numba
    from llvmlite import binding as _llvm
    from llvmlite import ir as _ir
    from numba.core import cgutils as _cgutils
    from numba.core import types as _types
    from numba.extending import intrinsic as _intrinsic
    from numba.extending import overload as _overload
except ImportError:  # pragma: no cover - numba is a dependency
    numba = None

V_ONE = 127  # one plane: v in [-127, 127] (ggml's Q8 activations)
V_TWO = 127 * 128  # two planes: v = 128 vh + vl, |vh| <= 127, |vl| <= 64
# Bytes ahead of each load to request (llvm.prefetch): on SmolLM2's output layer (49,152 x 576 Q8_0, 28 MB,
# one thread, alone; session 17's first, byte-row layout) 1.3 ms a token without, 0.95-1.0 ms with 256
# (512: 1.0-1.05, 1024+: no gain); on the layers' matrices (0.3-0.9 MB each) the distance made no difference
PREFETCH = 256
_TILE = 4096  # rows per pass over one block


MODES = {"fp32": 0, "int8": 1, "int16": 2}  # decoding activations -> int8 planes (0: fp32, the exact kernels)


def _has_vnni() -> bool:
    return "+avx512vnni" in _llvm.get_host_cpu_features().flatten().split(",")


def available() -> bool:
    """Whether this CPU multiplies int8 in hardware (AVX-512 VNNI): only then is this mode a default."""
    return numba is not None and not os.environ.get("LMLAB_NO_KERNELS") and _has_vnni()


def default_mode() -> str:
    """The decoding activations where nothing asks otherwise: two int8 planes where VNNI runs them."""
    return "int16" if available() else "fp32"


if numba is not None:
    # llvm.prefetch's name mangles its pointer type: "p0" with LLVM's opaque pointers (LLVM >= 15)
    _PREFETCH_FN = "llvm.prefetch.p0" if _llvm.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"
    _FM = {"reassoc", "contract", "nsz"}

    def _njit(*args, **kwargs):
        return numba.njit(*args, cache=True, nogil=True, **kwargs)

    _I8, _I16, _I32, _F32, _F16 = (_ir.IntType(8), _ir.IntType(16), _ir.IntType(32), _ir.FloatType(),
                                   _ir.HalfType())

    def _vec(t, n):
        return _ir.VectorType(t, n)

    def _splat(builder, value, n):
        v = builder.insert_element(_ir.Constant(_vec(value.type, n), _ir.Undefined), value, _ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, _ir.Constant(_vec(value.type, n), _ir.Undefined),
                                      _ir.Constant(_vec(_I32, n), [0] * n))

    def _shuffle(builder, a, b, mask):
        return builder.shuffle_vector(a, b, _ir.Constant(_vec(_I32, len(mask)), list(mask)))

    def _dpbusd(builder, acc, u, s, vnni):
        """acc [16 x i32] + the sums of four u8 x s8 products per lane (u, s: [64 x i8])."""
        if vnni:
            fnty = _ir.FunctionType(_vec(_I32, 16), [_vec(_I32, 16)] * 3)
            fn = _cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
            return builder.call(fn, [acc, builder.bitcast(u, _vec(_I32, 16)), builder.bitcast(s, _vec(_I32, 16))])
        p = builder.mul(builder.zext(u, _vec(_I32, 64)), builder.sext(s, _vec(_I32, 64)))
        for i in range(4):
            acc = builder.add(acc, _shuffle(builder, p, p, [4 * lane + i for lane in range(16)]))
        return acc

    def _make_tile(R: int, planes: int, vnni: bool | None = None):
        """An intrinsic adding blocks b0 .. b1 - 1 of rows r0 .. r0 + R - 1 (R a multiple of 16, <= 64) of
        y = W x into y: `tile(qt, d, m, xw, dx, sx, corr, y, r0, b0, b1)`, with qt [nb, J, n] the codes'
        words (lmlab/nn/quant_kernels.py `words`; uint32: Q4_1 bytes, J = 4; int32: int8 group codes,
        J = g / 4), scales d, m [nb, n] (float32 or fp16 bit patterns; m = d with sx = 0 when the
        format has no offsets), the quantized activations xw [planes, k / 4] (int8 codes viewed as int32,
        four inputs each), and per block dx (step), sx (fp32 sum of x, for the offsets) and corr (what the
        unsigned codes add: 128 v summed, int32). `vnni`: the instruction or generic vector code (None:
        as this CPU allows)."""
        C = R // 16  # 16-row chunks: one 512-bit accumulator each

        def typer(typingctx, qt, d, m, xw, dx, sx, corr, y, r0, b0, b1):
            return _types.void(qt, d, m, xw, dx, sx, corr, y, r0, b0, b1), codegen

        def codegen(context, builder, sig, args):
            qt_t, d_t = sig.args[0], sig.args[1]
            nib = qt_t.dtype == _types.uint32
            half = d_t.dtype == _types.uint16
            use = _has_vnni() if vnni is None else vnni
            arrs = [context.make_array(t)(context, builder, a) for t, a in zip(sig.args[:8], args[:8])]
            qa, da, ma, xa, dxa, sxa, ca, ya = arrs
            r0, b0, b1 = (context.cast(builder, a, t, _types.intp) for a, t in zip(args[8:], sig.args[8:]))
            J, n = _cgutils.unpack_tuple(builder, qa.shape, 3)[1:]
            k4 = _cgutils.unpack_tuple(builder, xa.shape, 2)[1]
            intp = n.type
            steps = 4  # Q4_1: words per block (J at run time for group codes)
            ybase = builder.bitcast(ya.data, _F32.as_pointer())
            yptr = [builder.bitcast(builder.gep(ybase, [builder.add(r0, _ir.Constant(intp, 16 * c))]),
                                    _vec(_F32, 16).as_pointer()) for c in range(C)]
            yacc = [_cgutils.alloca_once(builder, _vec(_F32, 16)) for _ in range(C)]
            for c in range(C):
                builder.store(builder.load(yptr[c], align=4), yacc[c])
            qbase = builder.bitcast(qa.data, _I8.as_pointer())
            pf = _cgutils.get_or_insert_function(builder.module, _ir.FunctionType(
                _ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]), _PREFETCH_FN)
            xbase = builder.bitcast(xa.data, _I32.as_pointer())
            scale_ty = _I16 if half else _F32
            dbase = builder.bitcast(da.data, scale_ty.as_pointer())
            mbase = builder.bitcast(ma.data, scale_ty.as_pointer())
            ahead_by = _ir.Constant(intp, PREFETCH)
            words = J if not nib else _ir.Constant(intp, 8)  # activation words per block
            with _cgutils.for_range_slice(builder, b0, b1, _ir.Constant(intp, 1), inc=True) as (b, _):
                accs = [[_ir.Constant(_vec(_I32, 16), [0] * 16) for _ in range(C)] for _ in range(planes)]
                row0 = builder.add(builder.mul(builder.mul(b, J), n), r0)  # qt[b, 0, r0], in words

                def rows_word(sidx):
                    """Word sidx of block b for the R rows: C chunks of [64 x i8], 16 rows' four codes each."""
                    off = builder.mul(builder.add(row0, builder.mul(sidx, n)), _ir.Constant(intp, 4))  # bytes
                    q = builder.gep(qbase, [off])
                    out = []
                    for c in range(C):
                        qc = builder.gep(q, [_ir.Constant(intp, 64 * c)])
                        ahead = builder.gep(qc, [ahead_by])  # read, keep, data
                        builder.call(pf, [ahead, *(_ir.Constant(_I32, v) for v in (0, 3, 1))])
                        out.append(builder.load(builder.bitcast(qc, _vec(_I8, 64).as_pointer()), align=1))
                    return out

                def word(p, w):
                    """Activation word w of block b in plane p, splat to [64 x i8]."""
                    off = builder.add(builder.mul(_ir.Constant(intp, p), k4), builder.add(builder.mul(b, words), w))
                    v = builder.load(builder.gep(xbase, [off]))
                    return builder.bitcast(_splat(builder, v, 16), _vec(_I8, 64))

                if nib:
                    for s in range(steps):
                        chunks = rows_word(_ir.Constant(intp, s))
                        for c in range(C):
                            lo = builder.and_(chunks[c], _ir.Constant(_vec(_I8, 64), [15] * 64))
                            hi = builder.lshr(chunks[c], _ir.Constant(_vec(_I8, 64), [4] * 64))
                            for p in range(planes):
                                accs[p][c] = _dpbusd(builder, accs[p][c], lo, word(p, _ir.Constant(intp, s)), use)
                                accs[p][c] = _dpbusd(builder, accs[p][c], hi, word(p, _ir.Constant(intp, 4 + s)),
                                                     use)
                else:
                    # runtime words per block (g / 4): the accumulators live in memory across that loop
                    slots = [[_cgutils.alloca_once(builder, _vec(_I32, 16)) for _ in range(C)] for _ in range(planes)]
                    for p in range(planes):
                        for c in range(C):
                            builder.store(accs[p][c], slots[p][c])
                    with _cgutils.for_range(builder, words) as inner:
                        s = inner.index
                        chunks = rows_word(s)
                        for c in range(C):
                            u = builder.xor(chunks[c], _ir.Constant(_vec(_I8, 64), [-128] * 64))
                            for p in range(planes):
                                builder.store(_dpbusd(builder, builder.load(slots[p][c]), u, word(p, s), use),
                                              slots[p][c])
                    accs = [[builder.load(slots[p][c]) for c in range(C)] for p in range(planes)]
                cb = _splat(builder, builder.load(builder.gep(builder.bitcast(ca.data, _I32.as_pointer()), [b])), 16)
                dxb = _splat(builder, builder.load(builder.gep(builder.bitcast(dxa.data, _F32.as_pointer()), [b])), 16)
                sxb = _splat(builder, builder.load(builder.gep(builder.bitcast(sxa.data, _F32.as_pointer()), [b])), 16)
                srow = builder.add(builder.mul(b, n), r0)  # d[b, r0]

                def scales(base, c):
                    """Block b's scales (or offsets) of rows r0 + 16 c .. + 15 as [16 x float]."""
                    off = builder.add(srow, _ir.Constant(intp, 16 * c))
                    p = builder.bitcast(builder.gep(base, [off]), _vec(scale_ty, 16).as_pointer())
                    v = builder.load(p, align=2 if half else 4)
                    return builder.fpext(builder.bitcast(v, _vec(_F16, 16)), _vec(_F32, 16)) if half else v

                for c in range(C):
                    isum = accs[0][c]
                    if planes == 2:
                        isum = builder.add(builder.shl(isum, _ir.Constant(_vec(_I32, 16), [7] * 16)), accs[1][c])
                    isum = builder.sub(isum, cb)
                    f = builder.fmul(builder.sitofp(isum, _vec(_F32, 16)), dxb)  # exact below 2^24, then rounded
                    t = builder.fadd(builder.fmul(scales(dbase, c), f), builder.fmul(scales(mbase, c), sxb))
                    builder.store(builder.fadd(builder.load(yacc[c]), t), yacc[c])
            for c in range(C):
                builder.store(builder.load(yacc[c]), yptr[c], align=4)
            return context.get_dummy_value()

        typer.__name__ = f"_tile{R}x{planes}"
        return _intrinsic(typer)

    _tile64_1, _tile16_1 = _make_tile(64, 1), _make_tile(16, 1)
    _tile64_2, _tile16_2 = _make_tile(64, 2), _make_tile(16, 2)

    def _signed(qt):  # pragma: no cover - compiled through the overload below
        """Whether the words `qt` hold int8 codes (int32 words) rather than Q4_1 bytes (uint32)."""

    @_overload(_signed, inline="always")
    def _signed_impl(qt):
        signed = qt.dtype == _types.int32
        return lambda qt: signed

    @_njit(fastmath=_FM)
    def quantize(x, g, planes, offsets, xq, dx, sx, corr):
        """The activations x [k] as int8 codes xq [planes, k] per group of g inputs: dx [k/g] the step, sx the
        fp32 sums (when `offsets`, else 0), corr 128 v summed (what unsigned weight codes add)."""
        k = x.shape[0]
        vmax = np.float32(V_TWO if planes == 2 else V_ONE)
        for b in range(k // g):
            xb = x[g * b:g * b + g]
            amax = np.float32(0.0)
            for j in range(g):
                amax = max(amax, abs(xb[j]))
            d = amax / vmax
            inv = vmax / amax if amax > 0 else np.float32(0.0)
            dx[b] = d
            tot = 0
            for j in range(g):
                v = np.int32(np.rint(xb[j] * inv))
                if planes == 2:
                    vh = np.int32(np.rint(np.float32(v) * np.float32(1.0 / 128.0)))
                    vl = v - 128 * vh
                    xq[0, g * b + j] = vh
                    xq[1, g * b + j] = vl
                    tot += vh * 128 + vl
                else:
                    xq[0, g * b + j] = v
                    tot += v
            corr[b] = 128 * tot
            # the offsets' term with the same rounded activations as the codes' term: the block's result is
            # then the weights times the quantized activations, sum (d q + m) dx v. With the exact sum of x
            # instead, Q4_1's error was d sum q (dx v - x), q in 0..15 all of one sign, against
            # sum (d q + m)(dx v - x) with m ~ -8 d centring the weights: ~2x the error (one plane on
            # SmolLM2 Q4_1 against fp32: KL 0.015 then, 0.0033 now; llama.cpp's 0.0036; docs/gguf/README.md)
            sx[b] = d * np.float32(tot) if offsets else np.float32(0.0)

    @_njit(fastmath=_FM)
    def rows_int(qt, d, m, x, y, a, b, planes, offsets, g):
        """Rows [a, a + 16 j) of y = W x on integer dot products, for the most whole 16s that fit in [a, b);
        returns where it stopped (the caller computes any rest). d, m as in `_make_tile`; the offsets m are
        used when `offsets` (else pass m = d: times sx = 0); qt int32: int8 group codes (g inputs per block),
        uint32: Q4_1 bytes."""
        k = x.shape[0]
        xq = np.empty((planes, k), dtype=np.int8)
        nb = k // g
        dx = np.empty(nb, dtype=np.float32)
        sx = np.empty(nb, dtype=np.float32)
        corr = np.empty(nb, dtype=np.int32)
        quantize(x, g, planes, offsets, xq, dx, sx, corr)
        if not _signed(qt):
            corr[:] = 0  # Q4_1 nibbles are unsigned already
        xw = xq.view(np.int32)
        b = a + (b - a) // 16 * 16
        y[a:b] = 0.0
        # one block at a time over a tile of up to _TILE rows (all of a layer's): the block's words side by
        # side, each a run of 4 L bytes
        for t0 in range(a, b, _TILE):
            t1 = min(b, t0 + _TILE)
            for b0 in range(nb):
                b1 = b0 + 1
                r = t0
                while r + 64 <= t1:
                    if planes == 2:
                        _tile64_2(qt, d, m, xw, dx, sx, corr, y, r, b0, b1)
                    else:
                        _tile64_1(qt, d, m, xw, dx, sx, corr, y, r, b0, b1)
                    r += 64
                while r < t1:
                    if planes == 2:
                        _tile16_2(qt, d, m, xw, dx, sx, corr, y, r, b0, b1)
                    else:
                        _tile16_1(qt, d, m, xw, dx, sx, corr, y, r, b0, b1)
                    r += 16
        return b
