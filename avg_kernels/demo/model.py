"""The demo model: paper 000's Model B adapted to small images (SPEC §7)."""
from __future__ import annotations

from torch import nn


def model_b(image_size: int = 8, depth: int = 4, channels: int = 8, width: int = 10, classes: int = 10) -> nn.Sequential:
    """conv3x3 pad 1 (1->C) + ELU + maxpool 2 -> conv3x3 pad 1 (C->C) + ELU + maxpool 2 -> flatten
    -> Linear(C*(H/4)^2, width) + Tanh -> (depth - 1) x [Linear(width, width) + Tanh] -> Linear(width, classes).

    Paper 000 stacks 27 narrow tanh layers; a plain 26-deep width-10 tanh MLP does not train on the
    digits in 100 RMSProp steps (SPEC §7), so the default depth is 4 (``--depth`` changes it).
    """
    if depth < 1:
        raise ValueError(f"depth={depth} must be >= 1")
    side = image_size // 4
    layers: list[nn.Module] = [
        nn.Conv2d(1, channels, 3, padding=1), nn.ELU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ELU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(channels * side * side, width), nn.Tanh(),
    ]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)
