"""``dpkernels`` command line: ``python -m dpkernels COMMAND [options]``."""

from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv), one line of help)
COMMANDS = {
    "profile": ("dpkernels.profiling.profile", "time and memory of every clipping mode against non-private training (the main job)"),
    "demo": ("dpkernels.demo", "each mode's error against a float64 per-sample oracle, on a small model"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m dpkernels COMMAND [options]   (or: dpkernels COMMAND [options])", "", "commands:"]
    lines += [f"  {name:{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "python -m dpkernels COMMAND --help lists a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    """0 after help (no argument, -h, --help); 2 with the usage on stderr for an unknown command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"dpkernels: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
