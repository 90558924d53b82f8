"""Keeping the package's secrets from the programs it runs.

Two parts. `program_environment` is what a program run gets: the worker's
environment without any variable that holds (or points to) a credential.
`protect_secrets` hides the secrets this process itself holds from processes
of the same uid: it blanks them in the initial environment block (what
/proc/PID/environ shows, whatever os.environ says later) and marks the process
non-dumpable, so /proc/PID/environ, /proc/PID/mem and ptrace are refused to
any process without CAP_SYS_PTRACE. Both are inherited across fork; exec
undoes neither for us, but a program's exec gives it its own, dumpable, image.

os.environ is left as it is: azure-identity reads its variables when a worker
builds its credential after the fork, and a SIGHUP reload reads SPOT_* again.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

# Everything under SPOT_ is our own configuration (the queue's connection string among it).
SECRET_PREFIXES = ("SPOT_",)
# Secrets, or paths to them, that the package or the SDKs it uses (azure-identity, the Azure Monitor exporter) read,
# and the storage credentials conventionally set beside them. Identifiers and endpoints (AZURE_CLIENT_ID,
# AZURE_TENANT_ID, AZURE_AUTHORITY_HOST, IDENTITY_ENDPOINT, MSI_ENDPOINT, IMDS_ENDPOINT) stay: they grant nothing,
# and a program that uses the VM's managed identity itself needs AZURE_CLIENT_ID to pick the same one.
SECRET_NAMES = frozenset({
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    "AZURE_CLIENT_SEND_CERTIFICATE_CHAIN",
    "AZURE_USERNAME",
    "AZURE_PASSWORD",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_FEDERATED_TOKEN",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "MSI_SECRET",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
})

PR_SET_DUMPABLE = 4


def is_secret(name: str) -> bool:
    return name in SECRET_NAMES or name.startswith(SECRET_PREFIXES)


def program_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without the package's secrets."""
    return {name: value for name, value in environ.items() if not is_secret(name)}


def protect_secrets() -> None:
    """Blank the secrets in this process's initial environment block and make it non-dumpable.
    Linux only; elsewhere (or where it fails) one warning, and the process runs on."""
    try:
        blank_initial_environment()
    except (OSError, ValueError, IndexError) as exc:
        log.warning("cannot blank secrets in /proc/%d/environ (%s)", os.getpid(), exc)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("cannot make this process non-dumpable (%s): same-uid processes may read its memory", exc)


def blank_initial_environment() -> list[str]:
    """Overwrite, in place, the value of every secret in the environment block the process started with
    (kept by the kernel as /proc/PID/environ); returns the names blanked. The C library's `environ`
    is pointed at fresh copies first, so getenv() and programs started without an explicit
    environment still see os.environ's values."""
    with open("/proc/self/stat", "rb") as fh:
        fields = fh.read().rsplit(b")", 1)[1].split()
    env_start, env_end = int(fields[47]), int(fields[48])  # fields 50 and 51 of proc(5), counted after the name
    if not 0 < env_start < env_end:
        raise ValueError("no environment block address in /proc/self/stat")
    block = ctypes.string_at(env_start, env_end - env_start)
    blanked: list[str] = []
    offset = 0
    for entry in block.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        text_name = name.decode(errors="replace")
        if sep and value and is_secret(text_name):
            current = os.environ.get(text_name)
            if current is not None:
                os.putenv(text_name, current)  # a heap copy for getenv(); the block's bytes are no longer used
            ctypes.memset(env_start + offset + len(name) + 1, 0, len(value))
            blanked.append(text_name)
        offset += len(entry) + 1
    return blanked
