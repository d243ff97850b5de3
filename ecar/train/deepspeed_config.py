"""The DeepSpeed config, generated from the typed config by one function and nowhere else."""

from __future__ import annotations

from typing import Any

from ecar.config import Config, gradient_accumulation_steps

BUCKET_ELEMENTS = 5 * 10**7


def deepspeed_config(config: Config, world_size: int, on_gpu: bool | None = None) -> dict[str, Any]:
    """DeepSpeed's JSON config for `config.train` at `world_size` workers.

    The batch identity micro x accumulation x world = global is checked here against the
    actual world size (the config only knows `train.num_workers`). The learning rate in the
    optimizer block is the peak; the loop sets each step's value from `schedule.lr_at`, so the
    schedule is a pure function of the step and resumes exactly without scheduler state.
    """
    train = config.train
    on_gpu = train.use_gpu if on_gpu is None else on_gpu
    accumulation = gradient_accumulation_steps(train, world_size)
    # fp16 is not offered: it fails on CPU, and bf16 needs no loss scaling on GPU.
    precision = {"bf16": {"enabled": True}} if train.precision == "bf16" else {}
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage >= 1:
        # DeepSpeed's default buckets hold 5e8 elements (2 GB in fp32) each, more than the
        # partitioning saves on a model of ~100M parameters; 5e7 keeps messages large enough.
        zero["reduce_bucket_size"] = BUCKET_ELEMENTS
        zero["allgather_bucket_size"] = BUCKET_ELEMENTS
    if train.zero_stage >= 2:
        # Without CUDA streams, overlapping communication only adds buffers.
        zero["overlap_comm"] = bool(on_gpu)
        zero["contiguous_gradients"] = True
    if train.zero_stage == 3:
        # Gather every parameter at forward time (no prefetch-and-keep): the memory saving is
        # the point of stage 3, and the tiny presets would otherwise keep everything resident.
        zero["stage3_param_persistence_threshold"] = 0
        zero["stage3_max_live_parameters"] = 10**8
        zero["stage3_prefetch_bucket_size"] = 0 if not on_gpu else 5 * 10**7
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": train.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                # FusedAdam needs CUDA; torch's AdamW is the same update on any device.
                "torch_adam": not on_gpu,
                "adam_w_mode": True,
            },
        },
        "zero_optimization": zero,
        **precision,
        "steps_per_print": 10**9,  # progress goes to MLflow, not DeepSpeed's stdout
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
