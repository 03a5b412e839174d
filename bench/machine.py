"""The machine/source record of every benchmark table: it lives in the package (``avg_kernels._machine``),
since ``python -m avg_kernels reproduce`` writes the same record; re-exported here for bench/."""
from avg_kernels._machine import (ROOT, extension_state, gpu_state, kernel_commit_line, machine_info,  # noqa: F401
                                  markdown, source_state)
