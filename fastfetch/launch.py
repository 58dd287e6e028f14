"""Run the project's scripts with the project's interpreter, whatever `python3` a shell finds.

`bin/fetch` and `encode/run.py` start with `#!/usr/bin/env python3`, which in a fresh shell is
the system Python, without the dependencies `make setup` installed into `.venv`. When the running
interpreter lacks any module the script needs and the project's `.venv` exists, the script
re-executes itself with `.venv/bin/python` (same arguments, same environment). An interpreter
that has them all (an activated venv, a conda env, a `pip install` elsewhere) is used as it is.
Standard library only: it runs before any dependency can be imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
VENV = os.path.join(ROOT, ".venv")
VENV_PYTHON = os.path.join(VENV, "bin", "python")
_REEXECUTED = "FASTFETCH_REEXECUTED"  # set for the re-executed process: never a second time

#: the top-level modules each script imports (its requirements, as import names)
FETCH_NEEDS = ("aiohttp", "PIL", "orjson", "pyarrow", "numpy", "huggingface_hub")
ENCODE_NEEDS = ("torch", "streaming", "tqdm", "PIL", "numpy", "diffusers")


def use_project_python(needs: tuple[str, ...]) -> None:
    """Re-execute this script under `.venv/bin/python` if any module of `needs` is missing here."""
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if not missing:
        return
    inside = os.path.realpath(sys.prefix) == os.path.realpath(VENV)  # a venv's python links to its base's
    if not inside and not os.environ.get(_REEXECUTED) and os.access(VENV_PYTHON, os.X_OK):
        os.environ[_REEXECUTED] = "1"
        os.execv(VENV_PYTHON, [VENV_PYTHON, *sys.argv])
    sys.exit(
        f"error: {sys.executable} has no module {', '.join(map(repr, missing))}: run `make setup` in {ROOT} "
        "(it installs every dependency into .venv, which this script then uses)"
    )
