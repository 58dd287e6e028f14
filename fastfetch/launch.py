"""Run the project's scripts with the project's interpreter, whatever `python3` a shell finds.

`bin/fetch` and `encode/run.py` start with `#!/usr/bin/env python3`, which in a fresh shell is
the system Python, without the dependencies `make setup` installed into `.venv`. When the running
interpreter lacks them and the project's `.venv` exists, the script re-executes itself with
`.venv/bin/python` (same arguments, same environment). An interpreter that has the dependencies
(an activated venv, a conda env, a `pip install` elsewhere) is used as it is. Standard library
only: it runs before any dependency can be imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv")
VENV_PYTHON = os.path.join(VENV, "bin", "python")


def use_project_python(needs: str) -> None:
    """Re-execute this script under `.venv/bin/python` if module `needs` is missing here."""
    if importlib.util.find_spec(needs) is not None:
        return
    inside = os.path.realpath(sys.prefix) == os.path.realpath(VENV)  # a venv's python links to its base's
    if not inside and os.access(VENV_PYTHON, os.X_OK):
        os.execv(VENV_PYTHON, [VENV_PYTHON, *sys.argv])
    sys.exit(f"error: {sys.executable} has no module {needs!r}: run `make setup` in {ROOT} "
             "(it installs every dependency into .venv, which this script then uses)")
