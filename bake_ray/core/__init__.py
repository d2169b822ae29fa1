"""The pure-PyTorch core: BAKE's maths, data and sampler, models, the training loop,
checkpoints and the typed config. Imports no Ray, MLflow or Optuna, so a run can be
understood (and tested) without a cluster."""
