import sys

from kvpool.lifeline import follow_parent

follow_parent()
from kvpool.worker.service import main

sys.exit(main())
