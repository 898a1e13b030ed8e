"""`python -m easymamba ...` runs the `easymamba` command (easymamba/cli.py)."""

import sys

from easymamba.cli import main

sys.exit(main())
