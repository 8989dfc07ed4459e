import sys

from kvpool.lifeline import follow_parent

follow_parent()
from kvpool.cli.main import main

sys.exit(main())
