"""End-to-end serving speed, dense vs compressed: ``python -m bench.kernels.e2e --help``.

The measurement ships with the package (``compress.speed``, also behind ``python -m compress
bench``); this is the repository's entry point to it, kept so the documented commands still work.
"""

import sys

from compress.speed import main

if __name__ == "__main__":
    sys.exit(main())
