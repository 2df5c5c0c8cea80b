"""``python -m mmpt ...``: the same command as ``mmpt``."""

import sys

from mmpt.cli import main

sys.exit(main())
