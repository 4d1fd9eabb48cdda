"""``python -m cli``: the ``fedlora`` console script."""

import sys

from cli.app import main

sys.exit(main())
