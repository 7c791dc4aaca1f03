"""Triton kernels with PyTorch references; installed as ``lbsearch.kernels``."""
