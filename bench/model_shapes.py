"""Parameter shapes of reference models, generated in code (no torchvision/transformers needed), for
the multi-tensor benchmarks and tests: what ``list(model.parameters())`` would hold, in that order.

* ``resnet152()``: torchvision's ResNet-152 (Bottleneck blocks [3, 8, 36, 3], 1000 classes):
  467 tensors, 60,192,808 values.
* ``transformer(...)``: a pre-LN Transformer (token + position embeddings, per layer LayerNorm,
  q/k/v/o projections with bias, a two-layer MLP, final LayerNorm; output tied to the embedding).
  ``TRANSFORMERS["small"]`` (4 layers, width 256) and ``TRANSFORMERS["gpt2"]`` (GPT-2 small: 12 layers,
  width 768, vocabulary 50257, context 1024: 124,439,808 values in 196 tensors).
"""
from __future__ import annotations

import math

Shape = tuple[int, ...]


def resnet152(num_classes: int = 1000) -> list[Shape]:
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 8), (256, 36), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),   # conv1, bn1
                       (planes, planes, 3, 3), (planes,), (planes,),     # conv2, bn2
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]  # conv3, bn3
            if b == 0:  # downsample: 1x1 conv + bn
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(num_classes, 2048), (num_classes,)]
    return shapes


def transformer(layers: int, width: int, mlp: int, vocab: int, context: int) -> list[Shape]:
    shapes: list[Shape] = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,)]  # ln_1
        for _ in range(4):  # q, k, v, o
            shapes += [(width, width), (width,)]
        shapes += [(width,), (width,)]  # ln_2
        shapes += [(mlp, width), (mlp,), (width, mlp), (width,)]
    shapes += [(width,), (width,)]  # ln_f
    return shapes


TRANSFORMERS = {
    "small": dict(layers=4, width=256, mlp=1024, vocab=8192, context=512),
    "gpt2": dict(layers=12, width=768, mlp=3072, vocab=50257, context=1024),
}

MODELS = {
    "resnet152": resnet152,
    "transformer_small": lambda: transformer(**TRANSFORMERS["small"]),
    "gpt2_small": lambda: transformer(**TRANSFORMERS["gpt2"]),
}


def numel(shapes: list[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)
