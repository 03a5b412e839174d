"""The papers' models, adapted to the data at hand (8×8 digits or 28×28 MNIST-like images).

* ``mlp``: paper 003 §5.3 — ``depth`` hidden Linear + ReLU layers, Kaiming (He) normal init, zero biases.
* ``resnet``: paper 003 §5.4 — a CIFAR-style ResNet (He et al.): conv 3×3 → 3 stages of ``blocks`` basic
  blocks (widths ``widths``, strides 1/2/2, parameter-free zero-padded shortcuts, "option A") → global
  average pool → Linear. ``blocks=3`` is ResNet-20. ``batchnorm=False`` drops every BatchNorm.
* ``model_a`` / ``model_b``: papers 000/002 Models A and B; padding keeps 8×8 inputs from vanishing.
  ``glorot_tanh_`` is paper 000 Appendix I's init (Glorot uniform, gain 5/3, zero biases).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def mlp(in_features: int, width: int, depth: int = 8, classes: int = 10) -> nn.Sequential:
    """Paper 003's MLP: ``depth`` x [Linear(·, width) + ReLU] -> Linear(width, classes); input (N, in_features)."""
    if depth < 1 or width < 1:
        raise ValueError(f"mlp: depth={depth} and width={width} must be >= 1")
    layers: list[nn.Module] = []
    d = in_features
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, classes))
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


class _Block(nn.Module):
    """Basic residual block: conv-(BN)-ReLU-conv-(BN) + shortcut, ReLU. The shortcut of a downsampling block
    takes every second pixel and zero-pads the new channels (no parameters, ResNet-20's option A)."""

    def __init__(self, cin: int, cout: int, stride: int, batchnorm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not batchnorm)
        self.bn1 = nn.BatchNorm2d(cout) if batchnorm else nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not batchnorm)
        self.bn2 = nn.BatchNorm2d(cout) if batchnorm else nn.Identity()
        self.relu2 = nn.ReLU()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        short = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return self.relu2(out + short)


def resnet(blocks: int = 3, widths: tuple[int, int, int] = (16, 32, 64), batchnorm: bool = True,
           in_channels: int = 1, classes: int = 10) -> nn.Sequential:
    """CIFAR ResNet-(6·blocks+2) on (N, in_channels, H, W) images (H, W >= 4); Kaiming init, zero biases.
    The final Linear is the last module (``model[-1]``: the C-methods give it an lr multiplier)."""
    if blocks < 1:
        raise ValueError(f"resnet: blocks={blocks} must be >= 1")
    w0 = widths[0]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, w0, 3, 1, 1, bias=not batchnorm),
                               nn.BatchNorm2d(w0) if batchnorm else nn.Identity(), nn.ReLU()]
    cin = w0
    for stage, w in enumerate(widths):
        for b in range(blocks):
            layers.append(_Block(cin, w, 2 if (stage > 0 and b == 0) else 1, batchnorm))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


def glorot_tanh_(net: nn.Module) -> nn.Module:
    """Paper 000 Appendix I: Glorot (Xavier) uniform weights with gain 5/3 (PyTorch's tanh gain), zero biases."""
    gain = nn.init.calculate_gain("tanh")
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight, gain=gain)
            nn.init.zeros_(m.bias)
    return net


def model_b(image_size: int = 8, tanh_layers: int = 27, width: int = 10, channels: tuple[int, int] = (8, 16),
            classes: int = 10) -> nn.Sequential:
    """Paper 000 Table 2 (Model B): conv 3×3 (1→c1) + ELU + maxpool 2 → conv 3×3 (c1→c2) + ELU + maxpool 2 →
    flatten → ``tanh_layers`` x [Linear(·, width) + Tanh] → Linear(width, classes). The paper has 27 tanh
    layers (1 + 26) on 28×28 with unpadded convs; here the convs pad 1 on inputs smaller than 16 pixels."""
    if tanh_layers < 1:
        raise ValueError(f"model_b: tanh_layers={tanh_layers} must be >= 1")
    pad = 1 if image_size < 16 else 0
    side = ((image_size + 2 * pad - 2) // 2 + 2 * pad - 2) // 2
    c1, c2 = channels
    layers: list[nn.Module] = [nn.Conv2d(1, c1, 3, padding=pad), nn.ELU(), nn.MaxPool2d(2),
                               nn.Conv2d(c1, c2, 3, padding=pad), nn.ELU(), nn.MaxPool2d(2), nn.Flatten()]
    d = c2 * side * side
    for _ in range(tanh_layers):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    layers.append(nn.Linear(d, classes))
    return glorot_tanh_(nn.Sequential(*layers))


def model_a(image_size: int = 8, classes: int = 10) -> nn.Sequential:
    """Paper 000 Table 1 (Model A): six ELU convs (3×3 1→8, 3×3 8→8, 5×5/2 8→16, 3×3, 3×3, 5×5/2 16→16)
    → flatten → Linear; the 3×3 convs pad 1 on inputs smaller than 16 pixels (else 8×8 would vanish)."""
    pad = 1 if image_size < 16 else 0
    layers: list[nn.Module] = [nn.Conv2d(1, 8, 3, padding=pad), nn.ELU(), nn.Conv2d(8, 8, 3, padding=pad), nn.ELU(),
                               nn.Conv2d(8, 16, 5, 2, 2), nn.ELU(), nn.Conv2d(16, 16, 3, padding=pad), nn.ELU(),
                               nn.Conv2d(16, 16, 3, padding=pad), nn.ELU(), nn.Conv2d(16, 16, 5, 2, 2), nn.ELU(),
                               nn.Flatten()]
    with torch.no_grad():
        d = nn.Sequential(*layers)(torch.zeros(1, 1, image_size, image_size)).shape[1]
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)
