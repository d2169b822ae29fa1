"""``python -m bake_ray.ready``: the cluster files and docs run it on the head; the check
itself is :mod:`bake_ray.scale.ready`."""

import sys

from bake_ray.scale.ready import main

if __name__ == "__main__":
    sys.exit(main())
