"""Optional parts of manifpt (pyproject extras), and the clear error when one is missing.

The core install attributes and builds rgb/freq indexes; training, export, the sl/ssl backbones and
the research tooling need the ``[train]`` extra.
"""

from __future__ import annotations

import importlib.util

from .errors import MissingExtraError

# Top-level modules of each optional extra (pyproject.toml).
EXTRA_MODULES = {
    "train": ("torch", "torchvision", "onnx", "onnxscript", "sklearn", "skimage", "matplotlib", "scipy"),
    "ray": ("ray",),
}
EXTRA_OF_MODULE = {module: extra for extra, modules in EXTRA_MODULES.items() for module in modules}


def _error(extra: str, module: str) -> MissingExtraError:
    return MissingExtraError(
        f"this needs {module}, part of manifpt's optional [{extra}] extra, which is not installed here. "
        f'Install it with: pip install "manifpt[{extra}]" (from a source checkout: pip install -e ".[{extra}]")'
    )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_extra(extra: str) -> None:
    """Raise MissingExtraError, naming the install command, unless every module of ``extra`` is there."""
    for module in EXTRA_MODULES[extra]:
        if not _installed(module):
            raise _error(extra, module)


def missing_extra(exc: ModuleNotFoundError) -> MissingExtraError | None:
    """The error to show for a failed import of an extra's module, or None for any other module."""
    module = (exc.name or "").partition(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    return _error(extra, module) if extra else None
