"""Environment for benchmarks that start Ray or MLflow; import it before either is imported.

Only switches that keep a run quiet and local (no auth token file, no telemetry, no Tune
result files): nothing that changes how fast Ray or Ray Train behave, so the benchmarks
measure the product's defaults.
"""

from __future__ import annotations

import os

QUIET_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}
for _key, _value in QUIET_ENV.items():
    os.environ.setdefault(_key, _value)
