"""Arithmetic and storage of a layer, exact vs lookup, per input sample.

Counting rules (one output row = one output pixel of a conv, one token/row of a dense layer; ``R`` rows
per sample; a sum of ``n`` terms costs ``n - 1`` adds; ``Dp = C * V`` is D padded to whole subspaces,
the width the encoder actually processes):

exact layer        multiplies ``R*D*M``                   adds ``R*(D-1)*M`` (+ ``R*M`` with a bias)
encode, l2         multiplies ``R*K*Dp``                  adds ``R*K*Dp``  (each of the K*C scores:
                   ``0.5||p||^2 - x.p`` = V multiplies, V-1 adds, 1 add of the centroid term)
encode, cosine     multiplies ``R*K*Dp``                  adds ``R*K*C*(V-1)``  (``x.u``, unit centroids)
encode, l1         multiplies 0                           adds ``R*K*C*(2V-1)`` (V subtractions, V-1 adds;
                   absolute values are sign clears and not counted)
argmin             compares ``R*C*(K-1)``
accumulate         adds ``R*(C-1)*M`` (integer table adds)
dequantise         multiplies ``R*M`` (one scale per output) and adds ``R*M`` with a bias

Storage: the exact layer keeps ``D*M`` float32 weights (+ ``M`` bias); the lookup layer keeps int8
tables ``C*K*M`` + a float32 scale per output (+ bias), and codebooks ``C*K*V`` float32 + ``C*K``
float32 score offsets (``0.5||p||^2`` for l2, zero for cosine/l1: one encode kernel serves all three).

Structured rewrites: a butterfly chain costs one multiply per factor nonzero per row (``sum p_k s_k``);
a low-rank pair ``R*(D + M)`` per row; Tucker-2 ``C*R_in`` per *input* pixel + ``R_in*R_out*KH*KW +
R_out*M`` per output pixel. Their storage is the float32 factors (+ bias).

Batch norm and bias ops folded into a layer are not counted separately: the exact column counts the
folded layer, as a compiler would run it.
"""

from __future__ import annotations

from tvm_lut.math import distances


def exact_ops(rows: int, d: int, m: int, has_bias: bool) -> dict[str, int]:
    return {
        "mul": rows * d * m,
        "add": rows * (d - 1) * m + (rows * m if has_bias else 0),
        "cmp": 0,
    }


def lut_ops(rows: int, c: int, k: int, v: int, m: int, distance: str, has_bias: bool) -> dict[str, int]:
    enc_mul, enc_add = distances.get(distance).encode_ops(c, k, v)
    return {
        "mul": rows * (enc_mul + m),
        "add": rows * (enc_add + (c - 1) * m + (m if has_bias else 0)),
        "cmp": rows * c * (k - 1),
        "encode_mul": rows * enc_mul,
        "encode_add": rows * enc_add,
    }


def weight_bytes(d: int, m: int, has_bias: bool) -> int:
    return 4 * (d * m + (m if has_bias else 0))


def table_bytes(c: int, k: int, m: int, has_bias: bool) -> int:
    return c * k * m + 4 * m + (4 * m if has_bias else 0)


def codebook_bytes(c: int, k: int, v: int, distance: str) -> int:  # noqa: ARG001 (same for every distance)
    return 4 * c * k * v + 4 * c * k


def butterfly_ops(rows: int, factor_rows: list[int], params: int, m: int, has_bias: bool) -> dict[str, int]:
    """A DeBut chain: one multiply per nonzero per row; each factor output sums ``s`` products
    (``s - 1`` adds), i.e. ``params - sum(p_k)`` adds per row (+ ``M`` bias adds)."""
    return {"mul": rows * params, "add": rows * (params - sum(factor_rows) + (m if has_bias else 0)), "cmp": 0}


def matmul_chain_ops(stages: list[tuple[int, int, int]], m: int, rows: int, has_bias: bool) -> dict[str, int]:
    """Consecutive matmul/conv stages ``(pixels, d, n)`` (``pixels`` rows of a ``d -> n`` product each),
    e.g. a low-rank pair or a Tucker-2 triple (+ ``rows * M`` bias adds)."""
    mul = sum(p * d * n for p, d, n in stages)
    add = sum(p * (d - 1) * n for p, d, n in stages) + (rows * m if has_bias else 0)
    return {"mul": mul, "add": add, "cmp": 0}


def param_bytes(params: int, m: int, has_bias: bool) -> int:
    """float32 storage of ``params`` factor weights (+ bias)."""
    return 4 * (params + (m if has_bias else 0))


#: 512-bit vector instructions per layer and sample, the counted bound of issue 32 (``instruction_bound``)
VECTOR_BYTES = 64


def instruction_bound(rows: int, d: int, m: int, v: int, k: int, encoder: str = "fp32") -> dict[str, float]:
    """Vector instructions (512-bit) one sample needs for a layer: int8 VNNI GEMM vs product-quantized lookup.

    The counts are what the inner loops must issue at best (register-blocked, loads amortised, one
    instruction per cycle), so their ratio is a bound on what lookup can gain, not a measurement:

    * int8 GEMM (ONNX Runtime's VNNI path): one ``vpdpbusd`` does 64 u8 x s8 multiply-adds:
      ``R * D * M / 64``.
    * lookup (``C = ceil(D / V)`` subspaces, K <= 16 int8 tables): one ``vpshufb`` reads 64 table bytes,
      one (row, output, subspace) each; widening them into the int16/int32 sums and moving the codes
      into place costs about two more: ``3 * R * C * M / 64``.
    * encode, fp32: ``K`` scores per subspace from ``V`` products each, 16 lanes: ``R * C * K * V / 16``;
      argmin over ``K``: ``R * C * K / 16`` compares and blends.
    * encode, int8 scores (VNNI): ``R * C * K * V / 64`` + the same argmin on int32 (``/ 16``).

    Per output the ratio lookup / int8 is ``3 / V + 4 K / M + 4 K / (V M)`` with an fp32 encoder and
    ``3 / V + K / M + 4 K / (V M)`` with an int8 one (D a multiple of V): lookup needs a large V *and* wide layers (large M)
    to issue fewer instructions than int8, and the encoder is the term that bites in narrow layers
    (at M = 64, K = 16, an fp32 encoder alone costs what the whole int8 layer does).
    """
    c = -(-d // v)
    lanes8, lanes32 = VECTOR_BYTES, VECTOR_BYTES // 4
    gemm = rows * d * m / lanes8
    lookup = 3 * rows * c * m / lanes8
    per_lane = lanes8 if encoder == "int8" else lanes32
    encode = rows * c * k * v / per_lane + rows * c * k / lanes32
    return {"int8_gemm": gemm, "lut_lookup": lookup, "lut_encode": encode, "lut_total": lookup + encode,
            "ratio": (lookup + encode) / gemm}
