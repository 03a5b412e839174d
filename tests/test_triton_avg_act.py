"""Triton-specific checks of avg_kernels/_triton/avg_act.py that the backend-parametrised parity tests
(test_avg_act.py) cannot make: the int64 index logic past 2^31 elements (SPEC §6: through the kernel's
own index helpers at an emulated program id, not by allocating tens of GB) and the launch table."""
from __future__ import annotations

import pytest
import torch

from avg_kernels.ops._backend import unavailable_reason

_reason = unavailable_reason("triton")
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"triton: {_reason}")

if _reason is None:
    import triton
    import triton.language as tl

    from avg_kernels._triton import avg_act as tri

    @triton.jit
    def _index_probe(pid, n, offs_ptr, full_ptr, mask_ptr, BLOCK: tl.constexpr):
        # The production kernel's index logic, evaluated for a program id passed as an int32 argument
        # (the type of tl.program_id), so a program far beyond 2^31 / BLOCK runs in a grid of one.
        offs = tri.block_offsets(pid, BLOCK)
        lanes = tl.arange(0, BLOCK)
        tl.store(offs_ptr + lanes, offs)
        tl.store(mask_ptr + lanes, (offs < n).to(tl.int8))
        tl.store(full_ptr + lanes, tri.block_is_full(pid, n, BLOCK).to(tl.int8) + lanes * 0)


def _device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_index_logic_beyond_2_31_elements(dtype):
    block = tri.launch_config(dtype).block
    n = 2**33 + 5  # a tensor of 8.6e9 elements, as the launcher would see it
    last = triton.cdiv(n, block) - 1
    cases = [2**31 // block - 1, 2**31 // block, 2**31 // block + 1, 2**32 // block + 3, last - 1, last]
    dev = _device()
    for pid in cases:
        assert pid < 2**31  # a valid grid x index
        offs = torch.empty(block, dtype=torch.int64, device=dev)
        full = torch.empty(block, dtype=torch.int8, device=dev)
        mask = torch.empty(block, dtype=torch.int8, device=dev)
        _index_probe[(1,)](pid, n, offs, full, mask, BLOCK=block)
        expect = torch.arange(block, dtype=torch.int64) + pid * block
        assert torch.equal(offs.cpu(), expect), f"pid={pid}: offsets wrap (int32 arithmetic?)"
        assert torch.equal(mask.cpu().bool(), expect < n)
        assert bool(full[0]) == ((pid + 1) * block <= n)
    # the tail program is partial: n - last * block elements
    assert int(mask.sum()) == n - last * block == 5 and not bool(full[0])


def test_launch_table_16_bytes_per_thread_per_tensor():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        cfg = tri.launch_config(dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        assert cfg.block * itemsize == cfg.num_warps * 32 * 16
        assert cfg.compute == (tl.float64 if dtype == torch.float64 else tl.float32)
    with pytest.raises(TypeError, match="torch.int32"):
        tri.launch_config(torch.int32)


def test_multi_program_grid_with_tail(fresh_seed):
    """Several full programs and a partial tail: every element written once (outputs start NaN)."""
    from _accuracy import spec_inputs

    import avg_kernels as ak
    from avg_kernels import EPS, reference
    from avg_kernels.activations import resolve

    block = tri.launch_config(torch.float32).block
    n = 3 * block + 7
    g, x, xn = spec_inputs(n, device=_device())
    out = ak.avg_act_backward(g, x, xn, "elu", backend="triton")
    ref = reference.avg_act_backward(g, x, xn, resolve("elu", {}), EPS)
    torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=2e-5, atol=2e-6)
