import sys

from ..shapes.calibrate import main

sys.exit(main())
