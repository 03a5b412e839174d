"""Triton kernels of avg_kernels, one module per op family (SPEC §5 "triton" backend).

* ``avg_act``: the averaged activation backward (SPEC §1), mirroring csrc/include/avg_kernels/activations.h.
* ``ag_update``: the multi-tensor AG-1 update and AG-2 rescale (SPEC §2).
* ``gram``: the im2col / Linear input Gram (SPEC §3), an implicit-GEMM kernel.
* ``ridge``: the ridge solve's prologue and eigen-epilogue (SPEC §3).
* ``aot``: the registry of production launch configurations and their ahead-of-time compile check
  for sm_80/sm_90 (registers, spills), run by tests/test_triton_aot.py without a GPU.

Only ``avg_kernels.ops`` imports these modules (lazily, when the "triton" backend is chosen). On a machine
without a GPU they run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""
