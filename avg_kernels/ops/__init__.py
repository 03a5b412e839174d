"""The public torch.library ops (torch.ops.avg_kernels.*) and their Python wrappers."""
from ._backend import BackendUnavailableError, available_backends, current_backend, use_backend
from .ag_update import ag1_update_, ag2_rescale_
from .avg_act import avg_act, avg_act_backward
from .gram import im2col_gram, linear_gram
from .ridge import ridge_solve

__all__ = ["BackendUnavailableError", "ag1_update_", "ag2_rescale_", "available_backends", "avg_act", "avg_act_backward",
           "current_backend", "im2col_gram", "linear_gram", "ridge_solve", "use_backend"]
