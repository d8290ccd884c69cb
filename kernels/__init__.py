"""Triton kernels and their launchers (allocate, grid, launch). Imports only torch and triton.

Shipped as ``vit_fast.kernels`` (setup.py package_dir), never as a top-level ``kernels`` module:
that name belongs to the PyPI package transformers imports.
"""
