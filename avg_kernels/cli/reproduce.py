"""Runs the papers' experiments in small (p003-mlp, p003-resnet, p000-model-b, p002-ag): table, JSON, PNG."""
from __future__ import annotations

import argparse

COMMAND = "reproduce"
HELP = "reproduce the papers' claims in small: p003-mlp, p003-resnet, p000-model-b, p002-ag (mean ± SEM over seeds)"


def configure(parser: argparse.ArgumentParser) -> None:
    from avg_kernels.reproduce import run

    run.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from avg_kernels.reproduce import run as reproduce_run

    return reproduce_run.main(args)
