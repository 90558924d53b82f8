"""A stand-in `nvidia-smi` for tests (no GPU exists on the development machines).

Built from the real output in tests/fixtures/nvidia/ (2 x H100 NVL, driver 550):
`install` writes an executable `nvidia-smi` into a directory for PATH that
answers the query the supervisor makes with `gpus` lines of that shape, and
answers other fields the way the real tool does (exit 2). Modes "garbage" and
"no-driver" print what a broken tool prints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nvidia"
QUERY = ["--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"]
NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.")


def query_output(gpus: int) -> str:
    """`gpus` lines shaped like the fixture's first line, with index and UUID counted up."""
    template = (FIXTURES / "query-gpu.csv").read_text().splitlines()[0]
    _, uuid, name, memory = [f.strip() for f in template.split(",")]
    prefix = uuid[: -len("000000000000")]
    return "".join(f"{i}, {prefix}{i:012d}, {name}, {memory}\n" for i in range(gpus))


def uuids(gpus: int) -> list[str]:
    return [line.split(", ")[1] for line in query_output(gpus).splitlines()]


def install(bin_dir: Path, gpus: int = 4, mode: str = "ok") -> Path:
    """mode: "ok", "garbage" (exit 0, unreadable lines) or "no-driver" (exit 9, as with no driver loaded)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    answers = {
        "ok": (0, query_output(gpus), ""),
        "garbage": (0, "<html>502 Bad Gateway</html>\nGPU zero, ???\n", ""),
        "no-driver": (9, NO_DRIVER + "\n", ""),
    }
    code, out, err = answers[mode]
    script = bin_dir / "nvidia-smi"
    script.write_text(f"""#!{sys.executable}
import sys
QUERY, CODE, OUT, ERR = {json.dumps(QUERY)}, {code}, {json.dumps(out)}, {json.dumps(err)}
if sys.argv[1:] != QUERY:
    sys.stderr.write('Field "x" is not a valid field to query.\\n')
    sys.exit(2)
sys.stdout.write(OUT)
sys.stderr.write(ERR)
sys.exit(CODE)
""")
    script.chmod(0o755)
    return script
