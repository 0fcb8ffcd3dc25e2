"""Run several ``ckpt-hooks`` command lines in one process, each through ``ckpt_hooks.cli.main``
as ``python -m ckpt_hooks.cli`` runs it; under torchrun, one process group serves them all (one
launch, not one per command). Writes the exit codes to ``CODES.{rank}.json``.

    torchrun ... tests/harness/cli_run.py COMMANDS.json CODES
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # so that running by path works

from ckpt_hooks.cli import main  # noqa: E402

if __name__ == "__main__":
    commands, codes = sys.argv[1:]
    done = [main([str(a) for a in argv]) for argv in json.loads(Path(commands).read_text())]
    Path(f"{codes}.{os.environ.get('RANK', '0')}.json").write_text(json.dumps(done))
