"""Triton kernels. Imported lazily by the dispatching ops so that CPU-only use needs no Triton."""
