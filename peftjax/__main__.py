"""``python -m peftjax``: the ``peftjax`` command."""

import sys

from peftjax.cli import main

if __name__ == "__main__":
    sys.exit(main())
