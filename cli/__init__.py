"""The ``fedlora`` command line: the top of the ladder (nothing below imports it).

``cli.app`` holds the explicit command table; each command lives in its own module
(``simulate``, ``runs``, ``export``, ``report``, the deployment commands), and the
process plumbing it needs (a local SuperLink, Flower's executables) sits beside them.
"""

from pathlib import Path

#: the Flower app ``simulate`` and ``run`` submit: this repository (its pyproject.toml)
APP_DIR = Path(__file__).resolve().parent.parent
