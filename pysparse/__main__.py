"""``pysparse`` / ``python -m pysparse``: the command line: ``pysparse bench ...``, ``pysparse compress
RECIPE --model MODULE:CALLABLE`` and ``pysparse plan MODULE:CALLABLE``."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the pysparse command line with ``argv`` (default: sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compress":
        from pysparse.compress.cli import main as compress_main

        return compress_main(argv[1:])
    if argv and argv[0] == "plan":
        from pysparse.plan.cli import main as plan_main

        return plan_main(argv[1:])
    from pysparse.bench.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
