"""Tiny HF Transformers models for the tests, built from configs (random init, never a download): GPT-2,
Llama and BERT (token ids in, the model's own language-model loss), ViT, ResNet and MobileNetV2 (images in,
cross-entropy on the logits). Dropout is 0 everywhere, so a step is a function of the batch alone.

    model = build("vit", dtype=torch.float64)      # train mode, seeded
    inputs, target = batch("vit", torch.float64)   # inputs: the model's positional arguments
    loss = loss_of(model, inputs, target)

``build`` skips the calling test (``pytest.importorskip``) when transformers is not installed. Sizes are the
smallest that keep each model's structure: width 32, 1-2 layers, 16x16 (ViT) or 32x32 images, batch 2.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

LM = ("gpt2", "llama", "bert")
NAMES = LM + ("vit", "resnet", "mobilenetv2")
VOCAB, TOKENS, CLASSES = 64, 8, 3
IMAGE = {"vit": 16, "resnet": 32, "mobilenetv2": 32}


def _config(T, name):
    if name == "gpt2":  # NewGELUActivation (the hand-written tanh-GELU), Conv1D layers, lm_head tied to wte
        return T.GPT2LMHeadModel, T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                               eos_token_id=0)
    if name == "llama":  # SiLUActivation (F.silu) in the gated MLP, RMSNorm, untied head
        return T.LlamaForCausalLM, T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                                 max_position_embeddings=32)
    if name == "bert":  # GELUActivation (F.gelu) in 2 layers and the MLM head; decoder tied to word embeddings
        return T.BertForMaskedLM, T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if name == "vit":  # 4x4 patches of 16x16 images: 16 patches + [CLS]; GELUActivation
        return T.ViTForImageClassification, T.ViTConfig(image_size=IMAGE[name], patch_size=4, hidden_size=32,
                                                        num_hidden_layers=2, num_attention_heads=2,
                                                        intermediate_size=64, num_labels=CLASSES)
    if name == "resnet":  # basic blocks, BatchNorm, nn.ReLU modules, a strided 1x1 shortcut
        return T.ResNetForImageClassification, T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                              layer_type="basic", num_labels=CLASSES)
    if name == "mobilenetv2":  # depthwise 3x3 convs (groups = channels), BatchNorm, nn.ReLU6 (TF "same" padding)
        return T.MobileNetV2ForImageClassification, T.MobileNetV2Config(
            image_size=IMAGE[name], depth_multiplier=0.25, expand_ratio=2.0, finegrained_output=False,
            classifier_dropout_prob=0.0, num_labels=CLASSES)
    raise ValueError(f"name: expected one of {NAMES}, got {name!r}")


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> torch.nn.Module:
    """The tiny model ``name`` (one of NAMES), parameters drawn after ``torch.manual_seed(seed)``, in ``dtype``;
    ``config``: attributes of its config to set (e.g. ``hidden_dropout_prob=0.1``)."""
    T = pytest.importorskip("transformers")
    T.logging.set_verbosity_error()
    cls, cfg = _config(T, name)
    for key, value in config.items():
        if not hasattr(cfg, key):
            raise ValueError(f"config: {type(cfg).__name__} has no attribute {key!r}")
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    return cls(cfg).to(dtype).train()


def batch(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, n: int = 2):
    """(inputs, target): token ids (n, 8) and None for a language model (its labels are the ids), else images
    (n, 3, S, S) of ``dtype`` and class indices (n,)."""
    g = torch.Generator().manual_seed(seed)
    if name in LM:
        return (torch.randint(0, VOCAB, (n, TOKENS), generator=g),), None
    s = IMAGE[name]
    return (torch.randn(n, 3, s, s, generator=g, dtype=dtype),), torch.randint(0, CLASSES, (n,), generator=g)


def loss_of(model, inputs, target) -> torch.Tensor:
    """The training loss: the language model's own shifted/masked cross-entropy, or cross-entropy on the logits."""
    if target is None:
        return model(*inputs, labels=inputs[0]).loss
    return F.cross_entropy(model(*inputs).logits, target)
