"""Triton kernels for the hot path; each file holds a kernel, its launcher and its torch reference."""
