#!/usr/bin/env python
"""Standalone script for `ckpt-hooks export-param-map` (same flags)."""
import sys

from ckpt_hooks.cli import main

if __name__ == "__main__":
    sys.exit(main(["export-param-map", *sys.argv[1:]]))
