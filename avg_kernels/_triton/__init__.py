"""Triton kernels of avg_kernels, one module per op family (SPEC §5 "triton" backend).

* ``ag_update``: the multi-tensor AG-1 update and AG-2 rescale (SPEC §2).

Only ``avg_kernels.ops`` imports these modules (lazily, when the "triton" backend is chosen). On a machine
without a GPU they run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""
