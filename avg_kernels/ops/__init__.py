"""The public ops (``torch.ops.avg_kernels.*``, SPEC §5), each declared once in its own file through the
registry (``_registry.py``), and their Python wrappers. ``OPS`` lists them; ``nn`` and ``optim`` reach the
kernels only through these ``Op`` objects (``Op.eager`` for their no-autograd calls)."""
from ._backend import (BackendUnavailableError, available_backends, check_backend, current_backend, unavailable_reason,
                       use_backend)
from ._registry import Op, OpSpec
from .ag_update import AG1_UPDATE, AG1_UPDATE_NEW, AG2_RESCALE, ag1_update_, ag1_update_new_, ag2_rescale_
from .avg_act import AVG_ACT, AVG_ACT_BACKWARD, avg_act, avg_act_backward
from .gram import IM2COL_GRAM, LINEAR_GRAM, im2col_gram, linear_gram
from .ridge import RIDGE_SOLVE, ridge_solve

#: Every public op, by name (one line per op).
OPS: dict[str, Op] = {op.name: op for op in (AVG_ACT_BACKWARD, AVG_ACT, AG1_UPDATE, AG1_UPDATE_NEW, AG2_RESCALE,
                                             IM2COL_GRAM, LINEAR_GRAM, RIDGE_SOLVE)}

__all__ = ["AG1_UPDATE", "AG1_UPDATE_NEW", "AG2_RESCALE", "AVG_ACT", "AVG_ACT_BACKWARD", "BackendUnavailableError", "IM2COL_GRAM",
           "LINEAR_GRAM", "OPS", "Op", "OpSpec", "RIDGE_SOLVE", "ag1_update_", "ag1_update_new_", "ag2_rescale_", "available_backends",
           "avg_act", "avg_act_backward", "check_backend", "current_backend", "im2col_gram", "linear_gram",
           "ridge_solve", "unavailable_reason", "use_backend"]
