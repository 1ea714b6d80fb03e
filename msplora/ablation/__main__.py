"""``python -m msplora.ablation run|report ...`` (the Makefile's entry): one-line errors, exit status 2."""

import sys

from msplora.ablation.cli import main
from msplora.errors import run_command

sys.exit(run_command("ablation", main, sys.argv[1:]))
