"""Research tooling around the casework pipeline: the generator zoo, evaluation protocols,
baselines, the benchmark, fingerprint analysis and the offline demo.

It imports the product modules; the product never imports it. Everything here needs the
``[train]`` extra (PyTorch, scikit-learn, scikit-image, matplotlib).
"""
