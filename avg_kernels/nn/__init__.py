"""Averaged activation modules, ``convert(model)`` and the recorder AG steps use (SPEC §4).

    import avg_kernels
    model = avg_kernels.nn.convert(model)           # swaps torch.nn activations in place, returns model
    avg_kernels.nn.report(model, example_inputs=x)  # what an AG step would NOT average, if anything

Modules: one per activation of the table ``avg_kernels.activations.TABLE`` (``ReLU``, ``GELU`` ...), each a
subclass of its ``torch.nn`` namesake with the same constructor arguments. Functional forms:
``avg_kernels.nn.functional``. Outside AG steps all of them are exactly PyTorch's op, forward and backward.
"""
from . import functional, modules
from ._recording import CheckpointingError, PairingError
from ._convert import ConvertReport, NotAveraged, convert, report, revert
from .modules import *  # noqa: F401,F403  (AveragedActivation and one class per table record)

__all__ = [*modules.__all__, "convert", "revert", "report", "ConvertReport", "NotAveraged", "PairingError",
           "CheckpointingError", "functional"]
