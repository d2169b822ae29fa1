"""``python -m bake_ray.compare``."""

import sys

from bake_ray.compare.cli import main

sys.exit(main())
