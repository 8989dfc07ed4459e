import sys

from kvpool.worker.service import main

sys.exit(main())
