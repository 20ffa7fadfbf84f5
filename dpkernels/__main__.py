"""``dpkernels`` command line: ``python -m dpkernels {demo,profile} [options]``."""

from __future__ import annotations

import sys

COMMANDS = {"demo": "dpkernels.demo", "profile": "dpkernels.profiling.profile"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: dpkernels {{{','.join(COMMANDS)}}} [options]   (dpkernels COMMAND --help for options)", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
