"""Training: a plain-torch loop (`loop`, `ema`, `schedule`) under thin adapters for DeepSpeed
(`deepspeed_config`, `engine`), Ray Train (`trainer`) and MLflow (`tracking`).

Nothing here imports Ray, DeepSpeed or MLflow at import time: the loop's unit tests run
without them.
"""
