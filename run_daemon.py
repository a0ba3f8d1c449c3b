#!/usr/bin/env python3
"""cemi-stream command line: ``python run_daemon.py --help``.

A thin layer: everything lives in :mod:`cemi_stream.cli`.
"""

import sys

from cemi_stream.cli import main

if __name__ == "__main__":
    sys.exit(main())
