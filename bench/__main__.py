"""``python -m bench`` from the repository root: the same runner as ``python -m avg_kernels bench``."""
import sys

from bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
