"""The cuda backend: Triton kernels for NVIDIA GPUs."""
