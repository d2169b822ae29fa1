"""``python -m bake_ray.tune``."""

import sys

from bake_ray.tune.cli import main

sys.exit(main())
