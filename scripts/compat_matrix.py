"""Print the compatibility matrix (README's section "Compatibility with OpenRLHF's modes", and with its notes
docs/compatibility.md) from dynamo_openrlhf/compatibility.py and the launcher's own checks, run for every cell up to
where Ray would start.

    python scripts/compat_matrix.py          # the table, then the notes (docs/compatibility.md from its table on)
    python scripts/compat_matrix.py --json   # the launcher's refusals per backend (tests/test_compat_matrix.py)

A script, not a package module: no module of dynamo_openrlhf may import the launcher (tests/test_imports.py).
"""

import sys

from dynamo_openrlhf.compatibility import main
from dynamo_openrlhf.train import main as launcher_main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], launcher_main))
