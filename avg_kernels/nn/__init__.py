"""Averaged activation modules, ``convert(model)`` and the recorder AG steps use (SPEC §4).

    import avg_kernels
    model = avg_kernels.nn.convert(model)           # swaps torch.nn activations in place, returns model
    avg_kernels.nn.report(model, example_inputs=x)  # what an AG step would NOT average, if anything

Modules: ``Tanh, Sigmoid, ReLU, LeakyReLU, ELU, GELU, SiLU, Softplus`` (constructor arguments of their
``torch.nn`` namesakes, which they subclass). Functional forms: ``avg_kernels.nn.functional``.
Outside AG steps all of them are exactly PyTorch's op, forward and backward.
"""
from . import functional
from ._recording import CheckpointingError, PairingError
from ._convert import ConvertReport, NotAveraged, convert, report, revert
from .modules import ELU, GELU, AveragedActivation, LeakyReLU, ReLU, Sigmoid, SiLU, Softplus, Tanh

__all__ = ["Tanh", "Sigmoid", "ReLU", "LeakyReLU", "ELU", "GELU", "SiLU", "Softplus", "AveragedActivation",
           "convert", "revert", "report", "ConvertReport", "NotAveraged", "PairingError", "CheckpointingError",
           "functional"]
