"""manifpt: attribute images to the generative model that made them (ManiFPT, CVPR 2024).

The casework pipeline, one module per stage:
images (decode) → spaces (embed) → manifold (nearest real image) → artifacts → inputs → train →
export → attribute → report, with :func:`run_attribution` running a whole case. Script it without
the CLI by importing from here::

    from manifpt_cli import RunSettings, Space, build_index, run_attribution

    settings = RunSettings(workers=2)
    settings.apply()
    build_index(["real/"], "real.h5", [Space.RGB, Space.FREQ], settings=settings)

Research tooling (zoo, evaluation, baselines, benchmark, fingerprint analysis, demo) lives in
:mod:`manifpt_cli.research`; nothing here imports it. Nothing here imports PyTorch either: the
stages that need it (training, export, sl/ssl backbones) import it when they run.
"""

__version__ = "0.2.0"

from .artifacts import ArtifactSet, LabelledSamples, PixelSet, extract_artifacts, load_artifacts, load_pixels
from .attribute import Attribution, AttributionRow, OnnxAttributor
from .casework import AttributionSummary, ReportTarget, render_case_report, run_attribution
from .errors import ManifptError
from .export import export_onnx
from .images import decode_image, discover_images
from .inputs import InputKind, TrainingSet
from .manifold import RealIndex, build_index, describe_index
from .progress import Progress
from .report import ReportFormat
from .settings import RunSettings
from .spaces import Space
from .train import TrainConfig, load_checkpoint, train_attributor, train_auto

__all__ = [
    "ArtifactSet",
    "Attribution",
    "AttributionRow",
    "AttributionSummary",
    "InputKind",
    "LabelledSamples",
    "ManifptError",
    "OnnxAttributor",
    "PixelSet",
    "Progress",
    "RealIndex",
    "ReportFormat",
    "ReportTarget",
    "RunSettings",
    "Space",
    "TrainConfig",
    "TrainingSet",
    "build_index",
    "decode_image",
    "describe_index",
    "discover_images",
    "export_onnx",
    "extract_artifacts",
    "load_artifacts",
    "load_checkpoint",
    "load_pixels",
    "render_case_report",
    "run_attribution",
    "train_attributor",
    "train_auto",
]
