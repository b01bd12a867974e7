"""``python -m kvquant``: the ``kvquant`` command (``accelerate launch -m kvquant calibrate …`` too)."""

import sys

from kvquant.cli import main

sys.exit(main())
