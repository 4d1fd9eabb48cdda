"""The ``fedlora`` console script starts without the model stack.

Every command a node or the coordinator's operator runs (``coordinator nodes``, ``client
enroll``, ``runs``, ``--help``) is a fresh process; torch, transformers and PEFT cost
~8 s to import on 2 cores, so the command table's modules import them only inside the
commands that train, evaluate or export.
"""

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "opacus", "flwr_datasets", "mlflow", "matplotlib")


def test_the_command_table_imports_no_model_stack():
    code = f"import cli.app, sys; loaded = set({HEAVY!r}) & set(sys.modules); assert not loaded, loaded"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_help_lists_every_command():
    from cli.app import COMMANDS

    done = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True, check=True)
    assert all(name in done.stdout for name in COMMANDS)
