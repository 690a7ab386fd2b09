"""``python -m fleetune``: the same as the ``fleetune`` command."""

import sys

from fleetune.cli import main

sys.exit(main())
