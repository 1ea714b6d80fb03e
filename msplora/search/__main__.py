import sys

from msplora.errors import run_command
from msplora.search.cli import main

sys.exit(run_command("search", main, sys.argv[1:]))
