"""Same as `opt-hooks report` (flags, output, exit codes), for a checkout without the entry point.

    python scripts/layer_report.py                      # the embedded default, offline
    python scripts/layer_report.py --help
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from opt_hooks.cli import main  # noqa: E402  (needs the path above)

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
