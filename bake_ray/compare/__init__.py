"""Does BAKE help? (``python -m bake_ray.compare``): arms x paired seeds as a Tune grid,
paired intervals and verdicts, and rechecks of a search's winner. The top of the package:
it may use every other part."""
