"""``python -m kdforge`` (also what ``accelerate launch -m kdforge`` runs)."""

import sys

from kdforge.cli import main

sys.exit(main())
