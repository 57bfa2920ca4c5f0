"""Write or check docs/flags.md, the --dynamo.* flag reference, from the launcher's parser.

    python scripts/flag_reference.py --out docs/flags.md          # regenerate
    python scripts/flag_reference.py --out docs/flags.md --check  # exit 1 if it is out of date
    python scripts/flag_reference.py                              # print it

A script, not a package module: no module of dynamo_openrlhf may import the launcher (tests/test_imports.py);
the rendering itself is dynamo_openrlhf.flag_reference.
"""

import argparse
import sys

from dynamo_openrlhf.flag_reference import main
from dynamo_openrlhf.train import PROG, add_dynamo_arguments


def dynamo_parser() -> argparse.ArgumentParser:
    """A parser with only the launcher's --dynamo.* group (OpenRLHF's own flags are documented by OpenRLHF)."""
    return add_dynamo_arguments(argparse.ArgumentParser(prog=PROG))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], dynamo_parser()))
