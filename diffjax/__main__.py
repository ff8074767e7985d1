"""`python -m diffjax COMMAND ...`: see diffjax.cli."""
import sys

from diffjax.cli import main

sys.exit(main())
