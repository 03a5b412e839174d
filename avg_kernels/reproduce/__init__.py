"""``python -m avg_kernels reproduce <study>``: the papers' experiments in small (SPEC §7).

Studies (``studies.py``): ``p003-mlp`` (paper 003 §5.3), ``p003-resnet`` (§5.4), ``p000-model-b`` (paper 000's
Model B), ``p002-ag`` (paper 002's AG-1/AG-2 metrics). Presets: ``--quick`` (CPU minutes, committed learning
rates from ``rates.json``), ``--full`` (closer to the papers' budgets, for a GPU), ``--tune`` (the rate grids
that produce ``rates.json``). Each run writes ``<study>[-tune].md/.json/.png`` under ``--out``.
"""
from .engine import RATES_FILE, load_rates
from .studies import STUDIES

__all__ = ["RATES_FILE", "STUDIES", "load_rates"]
