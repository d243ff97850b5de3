"""Training: a plain-torch loop (`loop`, `ema`, `schedule`) under thin adapters for DeepSpeed
(`deepspeed_config`, `engine`) and Ray Train (`trainer`); MLflow goes through `ecar.tracking`.

Nothing here imports Ray, DeepSpeed or MLflow at import time: the loop's unit tests run
without them.
"""
