"""Triton kernels for the GPU path, and the plan that decides where the small-batch GEMV runs."""
