"""Triton kernels for moving KV between an engine's paged cache and pool blocks.

This folder is the source of the subpackage ``kvpool.kernels`` (mapped in pyproject.toml).
Each kernel sits beside a plain-torch reference with the same signature.
"""
