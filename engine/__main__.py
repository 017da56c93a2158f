import os
import sys

# Idle OpenMP threads spin by default; on a shared 2-core machine that made one evaluation ~20x
# slower (measured in the app). Must be set before torch is imported; the user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402

sys.exit(main())
