"""GGUF's block formats unpacked, vectorised in numpy, into what lmlab's exact kernels multiply by:
integer codes and one float32 scale (and offset) per group of inputs, w = d q + m.

Layouts from ggml's ggml-common.h (`block_q4_0` ... `block_q6_K`), read here in the order llama.cpp's
gguf-py `quants.py` dequantizes them. Every scale is exact in float32: an fp16 d (11 significant bits)
times a K-quant sub-block scale (6 bits, or int8 for Q6_K) has at most 18 bits, and times a code
(at most 6 bits) at most 24. So D = d sc, M = -dmin m and D q are exact, and D q + M rounds once,
as gguf.quants' (d sc) q - dmin m does: the kernels multiply by the stored model's own weights.

- Q4_0: d, 32 nibbles; w = d (q - 8).               Q4_1: d, m, 32 nibbles; w = d q + m.
- Q5_0: d, 32 high bits, 32 nibbles; w = d (q - 16). Q5_1: d, m, high bits, nibbles; w = d q + m.
- Q8_0: d, 32 int8; w = d q.
- Q4_K (256 inputs): d, dmin, 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes of nibbles;
  w = d sc_j q - dmin m_j over sub-block j of 32.  Q5_K: Q4_K plus 32 bytes of high bits.
- Q6_K (256 inputs): 4 low bits, 2 high bits, sixteen int8 scales, d; w = d sc_j (q - 32) over 16.

`unpack(raw, qtype, n, k)` -> `Unpacked` (codes [n, k] int8 -- or uint8 for 4-bit codes --, d and m
[n, k / group] float32); IQ-quants are not unpacked here (lmlab/io/gguf/read.py dequantizes them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256  # inputs per K-quant super-block (ggml-common.h QK_K)

# format -> (inputs per block, bytes per block) (ggml-common.h static_asserts on sizeof(block_*))
BLOCKS: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210),
}
FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")  # codes 0..15 with one (d, m) per 32 inputs: lmlab's int4 layout


@dataclass
class Unpacked:
    codes: np.ndarray       # [n, k] integer codes (uint8 0..15 for FOUR_BIT, else int8)
    d: np.ndarray           # [n, k / group] float32 scales
    m: np.ndarray | None    # [n, k / group] float32 offsets (None: w = d q)
    group: int

    def dequantize(self) -> np.ndarray:
        n, k = self.codes.shape
        q = self.codes.astype(np.float32).reshape(n, -1, self.group)
        w = self.d[..., None] * q
        return (w if self.m is None else w + self.m[..., None]).reshape(n, k)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: low nibbles are inputs 0..15, high 16..31 (block_q4_0)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """[..., 4] bytes (a little-endian uint32) -> [..., 32] bits, bit j for input j (block_q5_0)."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _scale_min_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins of a Q4_K/Q5_K super-block's 12 bytes (ggml get_scale_min_k4)."""
    s = sc.reshape(*sc.shape[:-1], 3, 4)
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    scale = np.concatenate([d & 63, (md & 15) | ((d >> 2) & 48)], axis=-1)
    mins = np.concatenate([m & 63, (md >> 4) | ((m >> 2) & 48)], axis=-1)
    return scale.astype(np.float32), mins.astype(np.float32)


def unpack(raw: np.ndarray, qtype: str, n: int, k: int) -> Unpacked:
    """A GGUF tensor's bytes (`raw`, any shape, n rows of k inputs) as codes and group scales."""
    if qtype not in BLOCKS:
        raise ValueError(f"no exact kernel for {qtype} (have: {', '.join(BLOCKS)})")
    size, nbytes = BLOCKS[qtype]
    if k % size:
        raise ValueError(f"{qtype}: rows of {k} inputs are not whole blocks of {size}")
    b = np.asarray(raw).reshape(-1).view(np.uint8).reshape(n, k // size, nbytes)
    m = None
    if qtype in ("Q4_0", "Q4_1"):
        off = 2 if qtype == "Q4_0" else 4
        d, codes = _f16(b[..., 0:2]), _nibbles(b[..., off:])
        m = -8 * d if qtype == "Q4_0" else _f16(b[..., 2:4])  # -8 d is exact: w = d q - 8 d
        group = 32
    elif qtype in ("Q5_0", "Q5_1"):
        off = 2 if qtype == "Q5_0" else 4
        d = _f16(b[..., 0:2])
        q = _nibbles(b[..., off + 4:]) | (_high_bits(b[..., off:off + 4]) << 4)
        if qtype == "Q5_0":
            codes = q.astype(np.int8) - np.int8(16)
        else:
            codes, m = q.astype(np.int8), _f16(b[..., 2:4])
        group = 32
    elif qtype == "Q8_0":
        d, codes, group = _f16(b[..., 0:2]), b[..., 2:].view(np.int8), 32
    elif qtype in ("Q4_K", "Q5_K"):
        dd, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _scale_min_k4(b[..., 4:16])
        qs = b[..., -128:].reshape(n, -1, 4, 1, 32)  # 4 chunks of 32 bytes: low nibbles, then high
        q = np.concatenate([qs & 15, qs >> 4], axis=-2).reshape(n, -1, 8, 32)
        if qtype == "Q5_K":  # bit j of qh[l] is the fifth bit of input l of sub-block j
            qh = b[..., 16:48].reshape(n, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
            q = q | ((qh & 1) << 4)
            codes = q.astype(np.int8)
        else:
            codes = q
        d, m, group = dd[..., None] * sc, -(dmin[..., None] * mn), 32
    else:  # Q6_K
        ql = b[..., :128].reshape(n, -1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
        ql = (ql & 15).reshape(n, -1, 8, 32)
        qh = b[..., 128:192].reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)
        qh = (qh & 3).reshape(n, -1, 8, 32)
        codes = (ql | (qh << 4)).astype(np.int8) - np.int8(32)
        sc = b[..., 192:208].view(np.int8).astype(np.float32)
        d, group = _f16(b[..., 208:210])[..., None] * sc, 16
    codes = np.ascontiguousarray(codes).reshape(n, k)
    d = np.ascontiguousarray(d, dtype=np.float32).reshape(n, -1)
    m = None if m is None else np.ascontiguousarray(m, dtype=np.float32).reshape(n, -1)
    if qtype in FOUR_BIT:
        codes = codes.astype(np.uint8, copy=False)
    return Unpacked(codes, d, m, group)
