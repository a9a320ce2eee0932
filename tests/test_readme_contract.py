"""The documented commands run verbatim: the README contract test.

Every ``lightning-struct ...`` line of every ```` ```bash ```` block of README.md, and of every
```` ```bash contract ```` block of docs/*.md, is run as a user would type it: through ``bash``, in
one fresh working directory, in document order (README first, then docs/ by name), with only the
installed console script on the PATH and no W&B account. A line ending in ``\\`` continues on the
next; ``# comments`` are dropped.

The only things the test adds are here, in :data:`SIZE_OVERRIDES`: overrides that make a run
smaller (fewer batches per epoch, fewer Optuna trials) without changing what the command does, and
:data:`PLACEHOLDERS`, which fills a documented ``<time>`` with the run an earlier command made.
Nothing else is added anywhere (no sweep dir, no thread count, no logger change).

Run just this: ``pytest tests/test_readme_contract.py``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The one place where the contract test changes a documented command: size only.
SIZE_OVERRIDES: dict[str, list[str]] = {
    # appended to every `lightning-struct train ...` (the last value of a key wins in Hydra)
    "train": ["trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"],
    # appended when the command runs an Optuna search
    "hparams_search": ["hydra.sweeper.n_trials=2"],
    # `lightning-struct spectra` and `bench` lines run as written
}

# `<name>` in a documented command -> a function of the working directory giving the text
PLACEHOLDERS = {
    "<time>": lambda cwd: max(p.name for p in (cwd / "logs" / "quickstart" / "runs").iterdir()),
}

_FENCE = re.compile(r"^```(\S*)\s*(.*)$")


def documented_commands(path: Path, marker: str | None) -> list[str]:
    """``lightning-struct`` lines of the ```bash blocks of ``path`` (only those tagged ``marker`` if given)."""
    commands, block, in_block = [], False, False
    pending = ""
    for raw in path.read_text().splitlines():
        m = _FENCE.match(raw.strip())
        if m:
            if in_block:
                in_block = block = False
            else:
                in_block = True
                block = m.group(1) == "bash" and (marker is None or marker in m.group(2).split())
            continue
        if not block:
            continue
        line = raw.strip()
        if pending:
            line = pending + " " + line
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        if line.startswith("lightning-struct "):
            commands.append(_strip_comment(line))
    return commands


def _strip_comment(line: str) -> str:
    """The command without a trailing ``# comment`` (``#`` inside quotes is kept)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return shlex.join(list(lexer))


def all_commands() -> list[tuple[str, str]]:
    out = [("README.md", c) for c in documented_commands(REPO / "README.md", None)]
    for doc in sorted((REPO / "docs").glob("*.md")):
        out += [(f"docs/{doc.name}", c) for c in documented_commands(doc, "contract")]
    return out


def sized(command: str, cwd: Path) -> str:
    for name, fill in PLACEHOLDERS.items():
        if name in command:
            command = command.replace(name, fill(cwd))
    args = shlex.split(command)
    if args[1] == "train" and "--cfg" not in args:
        args += SIZE_OVERRIDES["train"]
        if any(a.startswith("hparams_search=") for a in args):
            args += SIZE_OVERRIDES["hparams_search"]
    return shlex.join(args)


def test_the_extraction_finds_the_documented_commands():
    found = [c for _, c in all_commands()]
    assert "lightning-struct train recipe=quickstart" in found
    assert "lightning-struct train -m recipe=quickstart seed=1,2,3" in found
    assert any(c.startswith("lightning-struct spectra ") for c in found)
    assert any("hparams_search=force_optuna" in c and "interval(1e-5, 2e-4)" in c for c in found), "continued lines"
    assert not any("[hydra overrides]" in c for c in found), "synopsis lines are text, not commands"


@pytest.mark.slow
def test_every_documented_command_runs_verbatim(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # a user without a W&B account
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    failures = []
    for where, command in all_commands():
        run = sized(command, tmp_path)
        proc = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            failures.append(f"{where}: `{command}`\n  ran: {run}\n  exit {proc.returncode}\n{proc.stderr[-2500:]}")
        elif command.split()[1] == "train" and "--cfg" not in command and "finished" not in proc.stdout:
            failures.append(f"{where}: `{command}` printed no end-of-run summary\n{proc.stdout[-1500:]}")
    assert not failures, "\n\n".join(failures)
