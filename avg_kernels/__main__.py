"""``python -m avg_kernels <command> ...``: see ``avg_kernels.cli`` (commands register themselves there)."""
import sys

from avg_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main())
