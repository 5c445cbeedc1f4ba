"""``python -m superfloat.cli``: the ``sfx`` command line (:mod:`superfloat.cli`)."""
import sys

from superfloat.cli import main

sys.exit(main())
