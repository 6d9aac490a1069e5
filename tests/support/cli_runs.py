"""Run `python -m worker.cli ...` as real subprocesses, several at once when they are
independent (each costs about a second of interpreter start-up and imports).

Arguments may be bytes: that is how a shell passes text that is not valid UTF-8 (Python
turns it into lone surrogates in `sys.argv`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from standins.services import REPO

Arg = str | bytes


@dataclass(frozen=True)
class CliResult:
    args: tuple[Arg, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def said(self) -> str:
        """stdout and stderr with rich's line wrapping undone."""
        return " ".join(f"{self.stdout}\n{self.stderr}".split())


def _argv(args: Sequence[Arg]) -> list[Arg]:
    return [sys.executable, "-m", "worker.cli", *args]


def _env(values: Mapping[str, str]) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", **values}


def outbox_cli(
    *args: Arg, env: Mapping[str, str], input: str | None = None, timeout: float = 60
) -> CliResult:
    done = subprocess.run(
        _argv(args),
        cwd=REPO,
        env=_env(env),
        input=input,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
    )
    return CliResult(tuple(args), done.returncode, done.stdout, done.stderr)


def outbox_cli_many(
    calls: Sequence[Sequence[Arg]],
    *,
    env: Mapping[str, str],
    inputs: Sequence[str | None] | None = None,
    extra_envs: Sequence[Mapping[str, str]] | None = None,
    timeout: float = 90,
) -> list[CliResult]:
    """Start every call at once, then wait for all; results in the order given.

    `inputs` and `extra_envs`, when given, hold one stdin text / environment override
    per call.
    """
    inputs = list(inputs) if inputs is not None else [None] * len(calls)
    extra_envs = list(extra_envs) if extra_envs is not None else [{}] * len(calls)
    assert len(inputs) == len(calls) == len(extra_envs)
    procs = [
        (
            tuple(args),
            text,
            subprocess.Popen(
                _argv(args),
                cwd=REPO,
                env=_env({**env, **extra}),
                stdin=subprocess.PIPE if text is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ),
        )
        for args, text, extra in zip(calls, inputs, extra_envs, strict=True)
    ]
    results = []
    for args, text, proc in procs:
        out, err = proc.communicate(
            input=text.encode() if text is not None else None, timeout=timeout
        )
        results.append(
            CliResult(
                args,
                proc.returncode,
                out.decode("utf-8", "replace"),
                err.decode("utf-8", "replace"),
            )
        )
    return results
