"""Thread settings shared by every stage, so decode workers plus compute threads never exceed the cores."""

from __future__ import annotations

import os


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def compute_threads(workers: int, threads: int | None = None) -> int:
    """Threads for PyTorch, FAISS and ONNX Runtime: what ``workers`` decode threads leave free."""
    if threads:
        return max(1, threads)
    return max(1, cpu_count() - max(0, workers - 1))


def configure_threads(threads: int) -> None:
    """Apply one thread budget to the libraries that are already imported."""
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
