import sys

from colorize_dist.cli import main

sys.exit(main())
