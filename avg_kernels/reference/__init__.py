"""Float64 pure-PyTorch ground truth for every op (readable first, fast never).

Every fast backend is tested against these functions; SPEC.md defines what they compute.
"""
from .ag_update import ag1_update_, ag1_update_new_, ag2_rescale_
from .avg_act import avg_act_backward
from .gram import im2col_gram, linear_gram
from .ridge import ridge_solve

__all__ = ["ag1_update_", "ag1_update_new_", "ag2_rescale_", "avg_act_backward", "im2col_gram", "linear_gram", "ridge_solve"]
