"""Benchmarks of avg_kernels (DESIGN.md "Benchmarks"): one module per op family + a shared harness.

Run them with ``python -m avg_kernels bench [--quick|--full] [--ops avg_act,...] [--out DIR]``
(or ``python -m bench ...`` from the repository root).

Adding an op family's benchmark:

1. write ``bench/<family>.py`` defining
       NAME = "<family>"
       def add_arguments(group): ...   # optional: its own command-line options (argparse group)
       def run(ctx: bench.harness.Context) -> bench.harness.Report: ...
   build each measurement with ``ctx.time(fn)`` (the one timing policy: Timer.blocked_autorange median on
   CPU, triton.testing.do_bench median on CUDA), put results in ``bench.harness.Row`` objects, and
   compute same-run ratios with ``bench.harness.add_ratios``;
2. add its module name to ``OPS`` below. The runner writes Markdown, JSON and a PNG for it.
"""

#: Op family name -> module that benchmarks it. Order = run order.
OPS = {
    "avg_act": "bench.avg_act",
    "ag_update": "bench.ag_update",
    "gram": "bench.gram",
    "ag_train": "bench.ag_train",
    "ridge": "bench.ridge",
    "coptim": "bench.coptim",
    "models": "bench.models",
}
#: Families a bare ``bench`` run leaves out (ask with ``--ops``): ``models`` needs transformers (the dev extra)
#: and takes minutes per model.
OPT_IN = ("models",)
