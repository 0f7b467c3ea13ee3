"""Compression methods (svd, ACIP, Taylor-Ridge minification, LLM Surgeon) and their CLI.

``python -m compress --help`` lists the options; `compress.api` is the Python API behind it.
Importing this package is light: methods, transformers and kernels load on first use.
"""

__version__ = "0.1.0"
