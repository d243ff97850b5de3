"""The DeepSpeed side of the loop's `Backend`: engine creation, collectives, sharded
checkpoints and gathering ZeRO-3 partitions. Imported only inside training workers.

Run inside a process group that Ray Train already set up (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ecar.config import Config
from ecar.models.blocks import Block
from ecar.train.deepspeed_config import deepspeed_config
from ecar.train.loop import LossModule

DEEPSPEED_TAG = "deepspeed"  # sub-folder of a checkpoint holding DeepSpeed's sharded state


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every transformer block's activations in backward instead of storing them.

    The block's `forward` is wrapped in place (not the module replaced), so parameter names,
    and with them checkpoints and exports, are unchanged. Returns the number of blocks.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, Block):
            inner = module.forward

            @functools.wraps(inner)
            def forward(*args, _inner=inner, **kwargs):
                if not torch.is_grad_enabled():  # sampling: nothing to save
                    return _inner(*args, **kwargs)
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            module.forward = forward
            count += 1
    return count


def _deepspeed_safe_globals() -> list:
    """The few non-tensor classes DeepSpeed pickles into its checkpoints (0.19: checked on
    ZeRO-0/2/3 fp32 and bf16 checkpoints); a new one fails loudly instead of executing."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _weights_only_load(path: str, map_location=None):
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


class DeepSpeedBackend:
    """`ecar.train.loop.Backend` over a DeepSpeed engine."""

    def __init__(self, model: nn.Module, config: Config, device: torch.device) -> None:
        import deepspeed  # heavy, and only meaningful inside a worker

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float32
        self.zero_stage = config.train.zero_stage
        if config.train.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.ds_config = deepspeed_config(config, self.world_size, on_gpu=device.type == "cuda")
        if self.dtype != torch.float32:
            # DeepSpeed casts parameters to bf16 but not buffers (e.g. fixed sine-cosine
            # positions), which would promote activations back to fp32 mid-network.
            for buffer in model.buffers():
                if buffer.is_floating_point():
                    buffer.data = buffer.data.to(self.dtype)
        module = LossModule(model)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module,
            model_parameters=[p for p in module.parameters() if p.requires_grad],
            config=self.ds_config,
            dist_init_required=False,
        )

    def forward(self, latents_BCHW, labels_B, generator):
        return self.engine(latents_BCHW, labels_B, generator)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)
        if not boundary:
            self.engine.step()  # DeepSpeed counts micro-steps in step(); no update happens here

    def step(self, lr: float) -> float | None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        norm = None
        if self.zero_stage == 0 and self.dtype == torch.float32:
            # DeepSpeed clips fp32 stage-0 gradients without keeping the norm; they are
            # whole and already averaged here, so measure them before the step.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        self.engine.step()
        if norm is None:
            value = self.engine.get_global_grad_norm()
            norm = None if value is None else float(value)
        return norm

    def all_true(self, flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item() == 1.0)

    def mean(self, values: list[float]) -> list[float]:
        if not values:
            return []
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return (tensor / self.world_size).tolist()

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name.removeprefix("model."), p) for name, p in self.engine.module.named_parameters()]

    def ema_sources(self) -> list[tuple[str, torch.Tensor]]:
        """Whole parameters, or under ZeRO-3 this rank's flat partition of each one."""
        if self.zero_stage == 3:
            return [(name, p.ds_tensor) for name, p in self.named_parameters()]
        return self.named_parameters()

    def gather(self, shadow: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Whole fp32 tensors from an EMA over `ema_sources`, on rank 0 (None elsewhere).

        Every rank must call this (ZeRO-3 partitions are all-gathered)."""
        if self.zero_stage != 3:
            return {name: t.detach().cpu().clone() for name, t in shadow.items()} if self.rank == 0 else None
        whole = {}
        for name, parameter in self.named_parameters():
            part = shadow[name].to(self.device)
            parts = [torch.empty_like(part) for _ in range(self.world_size)]
            dist.all_gather(parts, part)
            if self.rank == 0:
                flat = torch.cat(parts)[: parameter.ds_numel]
                whole[name] = flat.view(parameter.ds_shape).cpu()
        return whole if self.rank == 0 else None

    def state_bytes(self, extra: list[torch.Tensor]) -> int:
        """Bytes of the tensors this rank keeps between steps: the weights (or their ZeRO-3
        partitions), the optimizer's parameters (DeepSpeed's fp32 partitions) and moments, and
        `extra` (the EMA); each storage counted once, since ZeRO's flat buffers back many views."""
        tensors = [p.ds_tensor if self.zero_stage == 3 else p.data for p in self.engine.module.parameters()]
        base = getattr(self.optimizer, "optimizer", self.optimizer)  # ZeRO wraps torch's AdamW
        for group in base.param_groups:
            tensors.extend(group["params"])
        for state in base.state.values():
            tensors.extend(value for value in state.values() if torch.is_tensor(value))
        tensors.extend(extra)
        storages = {}
        for tensor in tensors:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    # ----- checkpoints ----------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """DeepSpeed's sharded state (module, optimizer partitions) under `directory/deepspeed`.
        Every rank writes its own shard files; Ray merges the ranks' folders."""
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        # DeepSpeed unpickles its files with weights_only=False, which would run whatever code
        # a tampered checkpoint carries; route its reads through the restricted unpickler.
        self.engine.checkpoint_engine.load = _weights_only_load
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:  # DeepSpeed returns (None, None) instead of raising
            raise FileNotFoundError(f"no DeepSpeed state under {directory}/{DEEPSPEED_TAG} for rank {self.rank}")
