"""Triton kernels of avg_kernels, one module per op family (SPEC §5 "triton" backend)."""
