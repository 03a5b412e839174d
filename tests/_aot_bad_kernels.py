"""Two deliberately bad Triton kernels for tests/test_triton_aot.py: proof that the AOT check can fail.

* ``spilling``: one warp holds a 16384-element float32 block (512 values per thread) live across a
  reduction, more than the 255 registers a thread may have, so ptxas must spill to local memory.
* ``type_error``: stores a pointer-typed value through a float pointer; the front end rejects it.

Imported only by that test's compile subprocess (never under TRITON_INTERPRET=1).
"""
import triton
import triton.language as tl

from avg_kernels._triton.aot import KernelConfig


@triton.jit
def spilling(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    mean = tl.sum(x, axis=0) / BLOCK
    tl.store(out_ptr + offs, x - mean)


@triton.jit
def type_error(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, x_ptr + offs)


CONFIGS = [
    KernelConfig(name="bad[spilling]", kernel=f"{__name__}:spilling",
                 signature={"x_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr"}, constexprs={"BLOCK": 16384},
                 num_warps=1, aligned=("x_ptr", "out_ptr")),
    KernelConfig(name="bad[type_error]", kernel=f"{__name__}:type_error",
                 signature={"x_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr"}, constexprs={"BLOCK": 128},
                 num_warps=4, aligned=("x_ptr", "out_ptr")),
]
