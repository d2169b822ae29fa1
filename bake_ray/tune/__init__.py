"""The search (``python -m bake_ray.tune``): Ray Tune with Optuna TPE and ASHA, the trial
trainable, the stored search record, ranking and the summary. Built on core, scale and
tracking; nothing below it imports it."""
