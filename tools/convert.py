#!/usr/bin/env python
"""Standalone script for `ckpt-hooks convert` (same flags)."""
import sys

from ckpt_hooks.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
