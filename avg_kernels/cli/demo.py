"""Trains the demo model on the embedded digits with every requested method (SPEC §7)."""
from __future__ import annotations

import argparse

COMMAND = "demo"
HELP = "train a small model with several methods (base, AG, C-methods): table + plot"


def configure(parser: argparse.ArgumentParser) -> None:
    from avg_kernels.demo import run as demo_run

    demo_run.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from avg_kernels.demo import run as demo_run

    return demo_run.main(args)
