"""``python -m ckpt_hooks.cli``: the ``ckpt-hooks`` command (also under torchrun)."""

import sys

from ckpt_hooks.cli import main

sys.exit(main())
