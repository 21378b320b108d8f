"""manifpt: attribute images to the generative model that made them (ManiFPT, CVPR 2024).

The pipeline, one module per stage:
images (decode) → spaces (embed) → manifold (nearest real image) → artifacts → train/export →
attribute → report. Import the functions from here to script it without the CLI.
"""

__version__ = "0.1.0"
