"""``pysparse`` / ``python -m pysparse``: the command line (today: ``pysparse bench ...``)."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the pysparse command line with ``argv`` (default: sys.argv[1:]); returns the exit status."""
    from pysparse.bench.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
