"""Exact dot products of 8-bit pixel rows, as integers, in ONNX Runtime's ``MatMulInteger``.

Two rgb embeddings are pixels p / 255, so their squared distance is an integer D = ‖q‖² + ‖r‖² −
2 q·r over 255², and integer products compute it with nothing to round. On CPUs with 8-bit dot
product instructions (x86 VNNI, Arm dot product) they also run several times faster than float32.
``MatMulInteger`` multiplies uint8 by int8, so the queries go in as q − 128 (it fits int8) and a
column of ones gives Σr: r·q = r·(q − 128) + 128·Σr.

Not every kernel is exact: x86 CPUs with AVX2 but without VNNI add pairs of u8 × s8 products in
saturating int16. So each kernel is checked once, on the products that saturate (255 × −128 and
255 × 127 in every position), and the first exact one is used: u8 × s8, then u8 × u8 (widened to
16 bits before it adds), then float64 BLAS, exact because every partial sum is an integer below
2⁵³. Columns go in chunks of ``COLUMN_CHUNK``, so no int32 accumulator can overflow.
"""

from __future__ import annotations

import numpy as np

COLUMN_CHUNK = 32_768  # · 255 · 255 < 2³¹: no int32 accumulator overflows, whatever the kernel
KERNELS = ("u8s8", "u8u8", "float64")


# The one-node ONNX model, written as protobuf here: the attribution path has ONNX Runtime but not
# the ``onnx`` package (tests check it against onnx.helper's). Field numbers: onnx/onnx.proto3.
UINT8, INT8, INT32 = 2, 3, 6  # TensorProto.DataType
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


def matmul_integer_model(query_type: int) -> bytes:
    """A serialised ModelProto: dots (int32, m × n) = MatMulInteger(rows (uint8, m × k), queries (k × n))."""
    node = _field(1, "rows") + _field(1, "queries") + _field(2, "dots") + _field(4, "MatMulInteger")
    graph = _field(1, node) + _field(2, "pixel_products")
    graph += _field(11, _tensor_info("rows", UINT8, ("m", "k"))) + _field(
        11, _tensor_info("queries", query_type, ("k", "n"))
    )
    graph += _field(12, _tensor_info("dots", INT32, ("m", "n")))
    return _field(1, IR_VERSION) + _field(7, graph) + _field(8, _field(1, "") + _field(2, OPSET))


def _integer_session(query_type: int, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(matmul_integer_model(query_type), options, providers=["CPUExecutionProvider"])


class PixelProducts:
    """r·q for uint8 rows r and uint8 queries q, exact, with the fastest exact kernel here.

    ``kernel`` forces one of ``KERNELS`` (tests run each); by default the first that passes
    :meth:`is_exact` is used.
    """

    def __init__(self, threads: int = 1, kernel: str | None = None) -> None:
        self.threads = threads
        self._sessions = {}
        if kernel is None:
            kernel = next(name for name in KERNELS if name == "float64" or self._checked(name))
        elif kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; one of {', '.join(KERNELS)}")
        types = {"u8s8": INT8, "u8u8": UINT8}
        if kernel in types:
            self._sessions[kernel] = _integer_session(types[kernel], threads)
        self.kernel = kernel

    def _checked(self, kernel: str) -> bool:
        try:
            probe = PixelProducts(self.threads, kernel)
        except Exception:  # an execution provider without the operator: not usable here
            return False
        return is_exact(probe)

    def operand(self, queries: np.ndarray) -> np.ndarray:
        """The (d, b or b + 1) query side of the products for (b, d) uint8 ``queries``."""
        if self.kernel == "u8s8":
            signed = np.empty((queries.shape[1], len(queries) + 1), dtype=np.int8)
            signed[:, :-1] = (queries.T.astype(np.int16) - 128).astype(np.int8)
            signed[:, -1] = 1  # Σr, for the +128·Σr that undoes the shift
            return signed
        if self.kernel == "u8u8":
            return np.ascontiguousarray(queries.T)
        return queries.T.astype(np.float64)

    def dots(self, rows: np.ndarray, operand: np.ndarray) -> np.ndarray:
        """(m, b) int64 r·q for (m, d) uint8 ``rows`` and an :meth:`operand` of b queries."""
        total = None
        for start in range(0, rows.shape[1], COLUMN_CHUNK):
            part = rows[:, start : start + COLUMN_CHUNK]
            side = operand[start : start + COLUMN_CHUNK]
            if self.kernel == "float64":
                chunk = np.rint(part.astype(np.float64) @ side).astype(np.int64)
            else:
                feeds = {"rows": np.ascontiguousarray(part), "queries": np.ascontiguousarray(side)}
                chunk = self._sessions[self.kernel].run(None, feeds)[0].astype(np.int64)
            total = chunk if total is None else total + chunk
        if self.kernel == "u8s8":
            return total[:, :-1] + 128 * total[:, -1:]
        return total


def is_exact(products: PixelProducts) -> bool:
    """Whether ``products`` are exact on the products that saturate 16-bit kernels."""
    width = 64
    rows = np.full((3, width), 255, dtype=np.uint8)
    rows[2, ::2] = 0
    queries = np.zeros((3, width), dtype=np.uint8)  # q − 128 = −128
    queries[1] = 255  # q − 128 = 127
    queries[2] = np.arange(width) * 4 % 256
    expected = rows.astype(np.int64) @ queries.T.astype(np.int64)
    return np.array_equal(products.dots(rows, products.operand(queries)), expected)
