"""``python -m avg_kernels demo``: train the demo model with several methods and compare them."""
from .methods import REGISTRY, Method, Settings, Trainer, register
from . import ag_methods  # noqa: E402,F401  (registers ag1, ag2, ag3-1 and <mode>/<base>)
from .model import model_b
from . import consequentialism  # noqa: F401,E402  (registers csgd, cnesterov, cadam)

__all__ = ["REGISTRY", "Method", "Settings", "Trainer", "register", "model_b"]
