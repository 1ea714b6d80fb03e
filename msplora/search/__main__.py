import sys

from msplora.search.cli import main

sys.exit(main())
