"""`[workload] command` to argv, checked at start: a command that cannot run is a configuration error
(exit 78 with one line), not a failure of every message it is given."""

from __future__ import annotations

import os
import shlex
import shutil

from worker.settings import ConfigError

ELF_MAGIC = b"\x7fELF"
SHEBANG_MAX = 256  # the kernel reads no more of a #! line (BINPRM_BUF_SIZE)
NESTED_INTERPRETERS_MAX = 4  # an interpreter that is itself a script: Linux follows a few levels


def resolve_command(command: str) -> list[str]:
    """argv with argv[0] an absolute path to a file the kernel can execute; ConfigError naming workload.command
    otherwise. `command` has passed settings validation (it splits into at least one word)."""
    argv = shlex.split(command)
    program = argv[0]
    if "/" in program:
        path = os.path.abspath(program)
        if not os.path.exists(path):
            raise ConfigError("workload.command", f"{program}: no such file")
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise ConfigError("workload.command", f"{program}: not an executable file")
    else:
        found = shutil.which(program)
        if found is None:
            raise ConfigError("workload.command", f"{program}: not found on PATH ({os.environ.get('PATH', '')})")
        path = os.path.abspath(found)
    problem = why_not_runnable(path)
    if problem:
        raise ConfigError("workload.command", f"{program}: {problem}")
    return [path, *argv[1:]]


def why_not_runnable(path: str, depth: int = 0) -> str | None:
    """Why execve() would refuse `path` (ENOEXEC, or ENOENT for a missing interpreter), or None.
    A file we cannot read is given the benefit of the doubt: the kernel may still run it."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(SHEBANG_MAX)
    except OSError:
        return None
    if head.startswith(ELF_MAGIC):
        return None
    if not head.startswith(b"#!"):
        return "cannot be executed: neither a #! script nor an ELF binary (start a script with e.g. #!/bin/sh)"
    line = head[2:].split(b"\n", 1)[0].decode(errors="replace").strip()
    interpreter, _, argument = line.partition(" ")
    interpreter, argument = interpreter.split("\t", 1)[0], argument.strip()
    if not interpreter:
        return "its #! line names no interpreter"
    if not os.path.isfile(interpreter) or not os.access(interpreter, os.X_OK):
        return f"its interpreter {interpreter} is not an executable file"
    if depth < NESTED_INTERPRETERS_MAX:
        nested = why_not_runnable(interpreter, depth + 1)
        if nested:
            return f"its interpreter {interpreter}: {nested}"
    if os.path.basename(interpreter) == "env":
        name = _env_command(argument)
        if name and shutil.which(name) is None:
            return f"its #! line runs {name!r} through env, which is not found on PATH ({os.environ.get('PATH', '')})"
    return None


def _env_command(argument: str) -> str | None:
    """The program `#!/usr/bin/env ARGUMENT` runs, where that is clear (a plain name, or -S NAME ...)."""
    if argument.startswith("-S"):
        words = argument[2:].split()
    elif argument.startswith("-"):
        return None  # other env options: not ours to second-guess
    else:
        words = [argument] if argument else []
    for word in words:
        if word.startswith("-") or "=" in word:
            continue
        return word
    return None
