"""Exact dot products of 8-bit pixel rows, as integers, in ONNX Runtime's ``MatMulInteger``.

Two rgb embeddings are pixels p / 255, so their squared distance is an integer D = ‖q‖² + ‖r‖² −
2 q·r over 255², and integer products compute it with nothing to round. On CPUs with 8-bit dot
product instructions (x86 VNNI, Arm dot product) they also run several times faster than float32.
``MatMulInteger`` multiplies uint8 by int8, so the queries go in as q − 128 (it fits int8) and a
column of ones gives Σr: r·q = r·(q − 128) + 128·Σr. The same products, with signed 8-bit
digits of the PCA basis on the right, project pixels onto it (:mod:`manifpt_cli.search`).

Not every kernel is exact: x86 CPUs with AVX2 but without VNNI add pairs of u8 × s8 products in
saturating int16. So each kernel is checked once, on the products that saturate (255 × −128 and
255 × 127 in every position), and the first exact one is used: u8 × s8, then u8 × u8 (widened to
16 bits before it adds), then float64 BLAS, exact because every partial sum is an integer below
2⁵³. Columns go in chunks of ``COLUMN_CHUNK``, so no int32 accumulator can overflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLUMN_CHUNK = 32_768  # · 255 · 255 < 2³¹: no int32 accumulator overflows, whatever the kernel
KERNELS = ("u8s8", "u8u8", "float64")


# The one-node ONNX models, written as protobuf here: the attribution path has ONNX Runtime but not
# the ``onnx`` package (tests check them against onnx.helper's). Field numbers: onnx/onnx.proto3.
FLOAT, UINT8, INT8, INT32 = 1, 2, 3, 6  # TensorProto.DataType
ATTRIBUTE_INT = 2  # AttributeProto.AttributeType
IR_VERSION, OPSET = 7, 13


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: bytes | str | int) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _tensor_info(name: str, elem_type: int, dims: tuple[str, str]) -> bytes:
    """ValueInfoProto: a 2-d tensor with named (dynamic) dimensions."""
    shape = b"".join(_field(1, _field(2, dim)) for dim in dims)
    tensor_type = _field(1, elem_type) + _field(2, shape)
    return _field(1, name) + _field(2, _field(1, tensor_type))


def _model(node: bytes, name: str, inputs: list[tuple[str, int, tuple[str, str]]], output) -> bytes:
    """A serialised ModelProto of one node, its graph ``name``, inputs and output (name, type, dims)."""
    graph = _field(1, node) + _field(2, name)
    graph += b"".join(_field(11, _tensor_info(*tensor)) for tensor in inputs)
    graph += _field(12, _tensor_info(*output))
    return _field(1, IR_VERSION) + _field(7, graph) + _field(8, _field(1, "") + _field(2, OPSET))


def matmul_integer_model(query_type: int) -> bytes:
    """dots (int32, m × n) = MatMulInteger(rows (uint8, m × k), queries (k × n))."""
    node = _field(1, "rows") + _field(1, "queries") + _field(2, "dots") + _field(4, "MatMulInteger")
    inputs = [("rows", UINT8, ("m", "k")), ("queries", query_type, ("k", "n"))]
    return _model(node, "pixel_products", inputs, ("dots", INT32, ("m", "n")))


def transposed_gemm_model() -> bytes:
    """products (float32, m × n) = Gemm(queries (m × k), rows (n × k), transB = 1)."""
    transpose_rows = _field(1, "transB") + _field(20, ATTRIBUTE_INT) + _field(3, 1)
    node = _field(1, "queries") + _field(1, "rows") + _field(2, "products") + _field(4, "Gemm")
    node += _field(5, transpose_rows)
    inputs = [("queries", FLOAT, ("m", "k")), ("rows", FLOAT, ("n", "k"))]
    return _model(node, "float_products", inputs, ("products", FLOAT, ("m", "n")))


def _session(model: bytes):
    """A one-thread session of one of the models here: the searches run blocks of queries on
    threads of their own instead (:func:`manifpt_cli.search.map_blocks`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class FloatProducts:
    """q·r in float32 for the rows of two matrices, in ONNX Runtime (MLAS): its AVX-512 kernels ran
    twice as fast as NumPy's bundled OpenBLAS on this project's machine (bench/exact_search.py).
    The search's bounds carry a margin for any float32 sum, in any order, with or without FMA."""

    def __init__(self) -> None:
        self._session = _session(transposed_gemm_model())

    def __call__(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(m, n) float32 ``queries @ rows.T`` for (m, k) and (n, k) float32 matrices."""
        if not queries.size or not rows.size:
            return np.zeros((len(queries), len(rows)), dtype=np.float32)
        feeds = {"queries": np.ascontiguousarray(queries), "rows": np.ascontiguousarray(rows)}
        return self._session.run(None, feeds)[0]


class PixelProducts:
    """r·q for uint8 rows r and uint8 queries q, exact, with the fastest exact kernel here.

    ``kernel`` forces one of ``KERNELS`` (tests run each); by default the first that passes
    :meth:`is_exact` is used.
    """

    def __init__(self, kernel: str | None = None) -> None:
        if kernel is not None and kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; one of {', '.join(KERNELS)}")
        for name in KERNELS if kernel is None else (kernel,):
            query_type = {"u8s8": INT8, "u8u8": UINT8}.get(name)
            try:
                session = None if query_type is None else _session(matmul_integer_model(query_type))
            except Exception:  # an execution provider without the operator: not usable here
                if kernel is not None:
                    raise
                continue
            self.kernel, self._session = name, session
            if kernel is not None or session is None or is_exact(self):  # float64 is exact by construction
                break

    def operand(self, values: np.ndarray, signed: bool | None = None) -> Operand:
        """The right-hand side of products for (n, d) integer ``values``: pixels (0..255) or
        signed digits (−127..127; by default, when any value is negative). Either is shifted into
        the kernel's type, and a column of ones gives Σr to undo the shift: r·v = r·(v + shift) −
        shift·Σr. Operands of one kind share one shift."""
        if signed is None:
            signed = bool(values.size) and int(values.min()) < 0
        if signed and int(np.abs(values).max()) > 127:
            raise ValueError("operand values must be pixels (0..255) or signed digits (−127..127)")
        shift, dtype = {"u8s8": (0 if signed else -128, np.int8), "u8u8": (128 if signed else 0, np.uint8)}.get(
            self.kernel, (0, np.float64)
        )
        data = np.empty((values.shape[1], len(values) + 1), dtype=dtype)
        if values.dtype == np.uint8 and shift == -128:  # p − 128 is p with its top bit flipped, as int8
            # Transposed by NumPy's copy, then flipped in order: twice as fast as flipping into the
            # transposed view (bench/exact_search.py's projection step).
            np.bitwise_xor(np.ascontiguousarray(values.T), np.uint8(0x80), out=data[:, :-1].view(np.uint8))
        else:
            data[:, :-1] = (values.T.astype(np.int16) + shift).astype(dtype)
        data[:, -1] = 1
        return Operand(data, shift)

    def products(self, rows: np.ndarray, operand: Operand) -> np.ndarray:
        """(m, n + 1) r·(v + shift) for (m, d) uint8 ``rows``, the last column Σr: int32 (as the
        kernel returns it) where d fits one chunk, else int64. :meth:`dots` undoes the shift."""
        total = None
        for start in range(0, rows.shape[1], COLUMN_CHUNK):
            part = rows[:, start : start + COLUMN_CHUNK]
            side = operand.data[start : start + COLUMN_CHUNK]
            if self.kernel == "float64":
                chunk = np.rint(part.astype(np.float64) @ side).astype(np.int64)
            else:
                feeds = {"rows": np.ascontiguousarray(part), "queries": np.ascontiguousarray(side)}
                chunk = self._session.run(None, feeds)[0]
            total = chunk if total is None else total.astype(np.int64, copy=False) + chunk
        return total

    def dots(self, rows: np.ndarray, operand: Operand) -> np.ndarray:
        """(m, n) int64 r·v for (m, d) uint8 ``rows`` and an :meth:`operand` of n vectors v."""
        total = self.products(rows, operand)
        if not operand.shift:  # signed digits in u8 × s8: nothing to undo
            return total[:, :-1].astype(np.int64)
        total = total.astype(np.int64, copy=False)
        return total[:, :-1] - operand.shift * total[:, -1:]


def pixel_squares(pixels: np.ndarray) -> np.ndarray:
    """‖p‖² (int64, exact) per row of (n, d) uint8 pixels: summed in int32 where no sum can pass
    2³¹ (d ≤ ``COLUMN_CHUNK``), which runs twice as fast as int64."""
    accumulator = np.int32 if pixels.shape[1] <= COLUMN_CHUNK else np.int64
    return np.einsum("ij,ij->i", pixels, pixels, dtype=accumulator).astype(np.int64, copy=False)


@dataclass(frozen=True)
class Operand:
    """The right-hand side of :meth:`PixelProducts.dots`: (d, n + 1) values + shift, and ones."""

    data: np.ndarray
    shift: int


def is_exact(products: PixelProducts) -> bool:
    """Whether ``products`` are exact on the products that saturate 16-bit kernels, for pixel
    and for signed operands."""
    width, columns = 512, 16  # shaped like the search's products, in case a kernel is picked by shape
    rows = np.full((3, width), 255, dtype=np.uint8)
    rows[2, ::2] = 0
    pixels = np.zeros((3, width), dtype=np.int64)  # shifted for u8 × s8: −128
    pixels[1] = 255  # shifted: 127
    pixels[2] = np.arange(width) * 4 % 256
    digits = np.stack([np.full(width, -127), np.full(width, 127), np.arange(width) * 4 % 255 - 127])
    pixels, digits = np.resize(pixels, (columns, width)), np.resize(digits, (columns, width))
    return all(
        np.array_equal(products.dots(rows, products.operand(values)), rows.astype(np.int64) @ values.T)
        for values in (pixels, digits)
    )
