#!/usr/bin/env python
"""Standalone script for `ckpt-hooks inspect` (same flags)."""
import sys

from ckpt_hooks.cli import main

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
