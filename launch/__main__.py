import sys

from splitserve.launch.cli import main

sys.exit(main())
