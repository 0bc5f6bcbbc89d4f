"""``python -m iseg.labels``: the same as ``iseg labels``."""

import sys

from ..shapes.calibrate import main

sys.exit(main())
