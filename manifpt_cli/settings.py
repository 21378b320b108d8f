"""Run settings shared by every stage: built once (the CLI does it in ``cli/options.py``), applied once.

Decode workers plus compute threads never exceed the cores: decoding runs in ``workers`` threads
of its own, alongside the compute, so by default the compute libraries get the cores that
``workers`` leaves free (at least one). Library entry points take a :class:`RunSettings` keyword
argument; scripts build one, call :meth:`RunSettings.apply` once, and pass it on.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from .errors import UsageError
from .progress import SILENT, Progress

DEFAULT_MAX_PIXELS = 100_000_000  # 100 megapixels: far above any generator output or photo
DEFAULT_MAX_FILE_BYTES = 256 * 2**20  # 256 MiB: a bigger "image" is refused without being read
DEFAULT_BATCH_SIZE = 64  # images per batch where a backbone embeds them, or where they are large
SMALL_IMAGE_BATCH_SIZE = 256  # images per batch of up to SMALL_IMAGE_SIDE px embedded without a backbone
SMALL_IMAGE_SIDE = 64  # px: 256 such images are 12 MiB as float32 embeddings


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RunSettings:
    """How a run uses the machine; none of these change a result.

    Attributes:
        batch_size: images per batch through embedding, search and the attributor; None: chosen
            for the images (:meth:`batch_for`).
        workers: threads decoding image files, ahead of and alongside the compute.
        threads: compute threads for PyTorch, FAISS and ONNX Runtime; None: the cores
            ``workers`` leaves free (at least one).
        device: PyTorch device for backbones, training and generators (``cpu``, ``cuda``, ...).
        max_pixels: images whose header declares more pixels are refused before decoding.
        max_file_bytes: files larger than this are refused without being read.
        sniff: find images by their content, whatever their name (default: by extension).
        progress: where progress is reported (the CLI plugs in a Rich bar).
    """

    batch_size: int | None = None
    workers: int = 1
    threads: int | None = None
    device: str = "cpu"
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: Progress = field(default=SILENT, compare=False)
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    sniff: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "workers", "max_pixels", "max_file_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be at least 1 (or None for automatic), got {self.threads}")

    def batch_for(self, image_size: int, backbone: bool = False) -> int:
        """Images per batch for images of ``image_size`` px: ``batch_size`` where one was given.

        Else ``SMALL_IMAGE_BATCH_SIZE`` for small images that no backbone embeds (rgb and freq at
        up to ``SMALL_IMAGE_SIDE`` px): their batches take a few MiB, and attribution's two threads
        share the search of batches of 128 or more (:mod:`manifpt_cli.shared_work`). Otherwise
        ``DEFAULT_BATCH_SIZE``: a backbone's activations at 224 px, or large images, make a batch
        costly in memory.
        """
        if self.batch_size is not None:
            return self.batch_size
        small = image_size <= SMALL_IMAGE_SIDE and not backbone
        return SMALL_IMAGE_BATCH_SIZE if small else DEFAULT_BATCH_SIZE

    @property
    def compute_threads(self) -> int:
        """Threads for PyTorch, FAISS and ONNX Runtime."""
        if self.threads:
            return self.threads
        return max(1, cpu_count() - self.workers)

    def apply(self) -> None:
        """Give FAISS, NumPy's BLAS and PyTorch the compute-thread budget (once per process, before
        heavy work).

        NumPy's BLAS reads its thread count when NumPy loads, before any option is parsed, so it
        is set here through threadpoolctl: left at one thread per core, its spinning threads
        would share the cores with the decoding threads and the attributor. PyTorch is not
        imported for this: where it is not loaded yet, ``OMP_NUM_THREADS`` tells it the budget
        when (if ever) it loads, so attribution never pays for importing it.
        """
        threads = self.compute_threads
        if "faiss" not in sys.modules or "torch" not in sys.modules:
            # Read once, when FAISS's or PyTorch's OpenMP loads: every thread's count, where
            # omp_set_num_threads sets only the calling thread's.
            os.environ["OMP_NUM_THREADS"] = str(threads)
        import faiss
        from threadpoolctl import threadpool_limits

        faiss.omp_set_num_threads(threads)
        threadpool_limits(limits=threads, user_api="blas")
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)

    def check_device(self) -> None:
        """Refuse an invalid or unavailable ``device`` early (PyTorch is imported only for non-CPU)."""
        if self.device == "cpu":
            return
        import torch

        try:
            parsed = torch.device(self.device)
        except RuntimeError as exc:
            raise UsageError(f"invalid device {self.device!r}: {exc}") from None
        if parsed.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device {self.device!r} asked for CUDA, but torch sees no CUDA device here; use cpu")


DEFAULT_SETTINGS = RunSettings()
