"""The README's commands as a new user types them: a fresh shell after `make setup`, whose PATH
does not hold `.venv/bin`, so `python3` is whatever the machine has."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, fetch_env, read_mds

VENV = ROOT / ".venv"
pytestmark = pytest.mark.skipif(
    Path(sys.prefix).resolve() != VENV.resolve(),
    reason="runs against the project's own .venv (what `make setup` builds and `make test` uses)",
)


def fresh_shell_env() -> dict[str, str]:
    """The environment of a new terminal: no venv activated, no venv directory on PATH."""
    env = fetch_env()
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not Path(p).resolve().is_relative_to(VENV.resolve())]
    env["PATH"] = os.pathsep.join(path or ["/usr/bin", "/bin"])
    return env


SHELL_PROGRAMS = {"make", "torchrun", "python", "python3", "pip", "bash", "source", "sbatch", "srun", "ray"}


def readme_commands() -> list[str]:
    """Every command line in the README's code blocks (fenced or indented), continuations joined."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    blocks += re.findall(r"((?:\n    [^\n]+)+)", text)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            program = line.split()[0] if line.strip() and "──" not in line else ""
            if "/" in program.strip("/") and not program.startswith(("s3:", "http")) or program in SHELL_PROGRAMS:
                commands.append(line.strip())
    return commands


def test_every_readme_program_resolves_in_a_fresh_shell() -> None:
    """The program of each README command exists as printed: a repository path, or a program on
    the PATH of a shell without the venv (bin/fetch, .venv/bin/torchrun, make, sbatch ...)."""
    env = fresh_shell_env()
    programs = {cmd.split()[0] for cmd in readme_commands()}
    assert {"bin/fetch", ".venv/bin/torchrun", "make"} <= programs, programs
    assert "torchrun" not in programs  # not on a fresh shell's PATH
    cluster_only = {"sbatch", "srun"}  # Slurm: present on the cluster, not here
    for program in programs - cluster_only:
        if "/" in program:
            assert os.access(ROOT / program, os.X_OK), f"README runs {program}, which is not an executable file"
        else:
            assert shutil.which(program, path=env["PATH"]), f"README runs {program}, not on a fresh shell's PATH"


def test_every_readme_fetch_command_parses() -> None:
    """Each `bin/fetch …` line of the README, its optional parts included (`[--split a|b]` read as
    `--split a`, `[A | B]` as A), is accepted by the parser: flags and choices the README prints exist."""
    from fastfetch.cli import build_parser

    fetches = [c for c in readme_commands() if c.startswith("bin/fetch ")]
    assert len(fetches) >= 8
    for command in fetches:
        words = re.sub(r"\s\|\s[^\]]*", "", command.split("#")[0])  # `[a | b]`: a
        words = re.sub(r"\|[^\s\]]+", "", words).replace("[", " ").replace("]", " ")
        try:
            build_parser().parse_args(shlex.split(words)[1:])
        except SystemExit:
            pytest.fail(f"README command does not parse: {command}")


def test_fetch_runs_as_printed_without_the_venv_on_path(tmp_path: Path) -> None:
    env = fresh_shell_env()
    shell = subprocess.run(
        ["sh", "-c", "command -v python3; python3 -c 'import sys; print(sys.prefix)'"], capture_output=True, text=True, env=env
    )
    assert str(VENV) not in shell.stdout  # the shell's python3 is not the venv's
    helped = subprocess.run(["bin/fetch", "--help"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: fetch")
    demo = subprocess.run(
        ["bin/fetch", "--dataset", "demo", "--out", str(tmp_path / "demo"), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stderr
    assert len(read_mds(tmp_path / "demo" / "mds")) > 40


def test_encoder_runs_as_printed_without_the_venv_on_path() -> None:
    env = fresh_shell_env()
    for cmd in (
        ["python3", "encode/run.py", "--help"],
        [".venv/bin/torchrun", "--nproc_per_node", "1", "encode/run.py", "--help"],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, (cmd, proc.stderr[-2000:])
        assert "--text-encoder" in proc.stdout, cmd


def test_launcher_hazards(tmp_path: Path) -> None:
    """A symlink to bin/fetch works; importing encode.run never replaces the importing process;
    an interpreter that has one dependency but not the rest is still replaced by the venv's."""
    env = fresh_shell_env()
    link = tmp_path / "fetch"
    link.symlink_to(ROOT / "bin" / "fetch")
    proc = subprocess.run([str(link), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: fetch"), proc.stderr
    imported = subprocess.run(
        ["python3", "-c", "import sys; sys.path.insert(0, '.'); import encode.run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert "Argument expected" not in imported.stderr  # not re-executed as `python -c` without its code
    partial = tmp_path / "partial"  # aiohttp alone, as an apt-installed python3-aiohttp gives
    partial.mkdir()
    import aiohttp

    (partial / "aiohttp").symlink_to(Path(aiohttp.__file__).parent)
    proc = subprocess.run(
        ["bin/fetch", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120, env={**env, "PYTHONPATH": str(partial)}
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: fetch"), proc.stderr
