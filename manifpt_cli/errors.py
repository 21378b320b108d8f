"""Errors raised by the library, and the exit codes the CLI maps them to.

The library raises; only the CLI turns an error into a message and an exit code.
"""

from __future__ import annotations

# Exit codes are a public contract (README, "Exit codes").
EXIT_OK = 0
EXIT_FAILURE = 1  # the run could not be done (bad index, missing weights, mismatched model, ...)
EXIT_USAGE = 2  # wrong options or arguments (Click's convention)
EXIT_PARTIAL = 3  # the run finished, but some input files failed; each one is an error row
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), the shell's convention


class ManifptError(Exception):
    """Base class of every error manifpt raises on purpose; its message says what to do next."""

    exit_code = EXIT_FAILURE


class UsageError(ManifptError):
    """The caller asked for something that cannot work (unknown space, empty folder, ...)."""

    exit_code = EXIT_USAGE


class ImageDecodeError(ManifptError):
    """One input file could not be turned into an image; reported as one error row."""


class WeightsNotFoundError(ManifptError):
    """Pretrained embedding weights are neither in the torch hub cache nor given as a file."""


class FormatError(ManifptError):
    """An HDF5, checkpoint or ONNX file is not what manifpt wrote, or of another format version."""


class MismatchError(ManifptError):
    """A model and an index (or two files) were not made for each other."""


class ExportParityError(ManifptError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the stated tolerance."""


class MissingExtraError(UsageError):
    """The command needs an optional part of manifpt that this installation lacks."""
