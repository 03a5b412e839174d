"""avg_kernels: fused kernels for average-gradient training and consequentialism weight updates.

Public API (see README.md and SPEC.md):
    avg_act, avg_act_backward, EPS, ACTIVATIONS        averaged activation ops (SPEC §1)
    ag1_update_, ag1_update_new_, ag2_rescale_           multi-tensor AG-1 / AG-2 updates (SPEC §2)
    im2col_gram, linear_gram                             input Grams of im2col layers (SPEC §3)
    ridge_solve                                          batched ridge solve G (A + λI)⁻¹ (SPEC §3)
    available_backends, use_backend                      backend choice (SPEC §5)
    cpu_capability                                       SIMD level of the C++ CPU kernels in use (SPEC §5)
    avg_kernels.nn       averaged activation modules, convert(model)      (SPEC §4)
    avg_kernels.optim    AG-1 / AG-2 / AG-3-1 steps over a torch.optim base (SPEC §4);
                         CSGD (C-SGD, C-Nesterov), CAdam consequentialism optimizers (SPEC §3)
    avg_kernels.metrics  RD and relative sample efficiency                 (SPEC §4)
"""
from . import _build
from ._build import cpu_capability
from .activations import ACTIVATIONS, EPS
from .ops import (BackendUnavailableError, ag1_update_, ag1_update_new_, ag2_rescale_, available_backends, avg_act,
                  avg_act_backward, current_backend, im2col_gram, linear_gram, ridge_solve, use_backend)

_build.extension()  # registers torch.ops.avg_kernels_C.* when the extension is built

from . import metrics, nn, optim  # noqa: E402  (model-level layers, above the ops)

__version__ = "0.1.0"
__all__ = ["ACTIVATIONS", "EPS", "BackendUnavailableError", "ag1_update_", "ag1_update_new_", "ag2_rescale_", "available_backends", "avg_act",
           "avg_act_backward", "cpu_capability", "current_backend", "im2col_gram", "linear_gram", "ridge_solve", "use_backend", "metrics",
           "nn", "optim"]
