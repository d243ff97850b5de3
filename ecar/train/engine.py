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
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


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


def skip_shared_memory_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory op (a minute or more on a machine's
    first run): only its inference all-reduce uses the op; ZeRO training reduces through gloo."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


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
        if device.type == "cpu":
            skip_shared_memory_op()
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

    def master_pieces(self) -> list[tuple[str, torch.Tensor, int]]:
        """(name, this rank's piece of the fp32 master weights as a flat tensor, where the piece
        starts in the flattened parameter), for every parameter in `named_parameters` order.

        The masters are what the optimizer steps: under bf16 the module holds a bf16 copy of
        them, which is not what the EMA or a checkpoint should follow. ZeRO-3: this rank's
        partition of each parameter; ZeRO-1/2 (and bf16 at stage 1): the slice of each parameter
        inside this rank's flat fp32 partition (often empty); stage 0: DeepSpeed's fp32 copy of
        each parameter under bf16, the parameters themselves under fp32. The dispatch of
        `deepspeed.utils.safe_get_full_fp32_param` without its all-reduce, plus stage 0, which
        that function does not cover."""
        from deepspeed.utils import safe_get_local_fp32_param

        # stage-0 bf16: DeepSpeed's unfused optimizer steps fp32 clones of the bf16 parameters
        stage0 = getattr(self.optimizer, "fp32_groups", None) if self.zero_stage == 0 else None
        copies = (
            {}
            if stage0 is None
            else {
                id(low): high
                for lows, highs in zip(self.optimizer.fp16_groups, stage0)
                for low, high in zip(lows, highs)
            }
        )
        pieces = []
        for name, parameter in self.named_parameters():
            if hasattr(parameter, "ds_id"):
                partition = safe_get_local_fp32_param(parameter)  # padded to world x partition size
                start = self.rank * partition.numel()
                pieces.append((name, partition[: max(0, parameter.ds_numel - start)], start))
            elif hasattr(parameter, "_hp_mapping"):
                mapping = parameter._hp_mapping
                if mapping is None:  # this parameter lies wholly in other ranks' partitions
                    pieces.append((name, torch.empty(0, device=self.device), 0))
                else:
                    pieces.append((name, mapping.hp_fragment, mapping.lp_fragment_address.start))
            else:
                pieces.append((name, copies.get(id(parameter), parameter).detach().view(-1), 0))
        return pieces

    @property
    def partitioned(self) -> bool:
        """Whether each rank's master pieces are parts of the weights rather than whole copies."""
        return self.zero_stage > 0 and self.world_size > 1

    def ema_sources(self) -> list[tuple[str, torch.Tensor]]:
        """This rank's pieces of the fp32 master weights (see `master_pieces`): the EMA is
        partitioned like the optimizer and costs 1/world of a copy."""
        return [(name, piece) for name, piece, _ in self.master_pieces()]

    def gather(self, pieces: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Whole fp32 tensors in the model's shapes from tensors laid out like `ema_sources`
        (the EMA), on rank 0 (None elsewhere). Every rank must call this when the pieces are
        partitioned: each parameter is summed onto rank 0 from its zero-padded pieces."""
        shapes = self._shapes()
        whole = {}
        for name, _, start in self.master_pieces():
            piece = pieces[name].detach().to(self.device, torch.float32).view(-1)
            if not self.partitioned:
                whole[name] = piece.view(shapes[name]).cpu().clone()
                continue
            flat = torch.zeros(shapes[name].numel(), dtype=torch.float32, device=self.device)
            flat[start : start + piece.numel()] = piece
            dist.reduce(flat, dst=0)
            whole[name] = flat.view(shapes[name]).cpu()
        return whole if self.rank == 0 else None

    def pieces_of(self, whole: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's pieces of whole tensors (the inverse of `gather`), e.g. to load an EMA
        saved at another world size."""
        return {
            name: whole[name].reshape(-1)[start : start + piece.numel()].clone()
            for name, piece, start in self.master_pieces()
        }

    # ----- world-size-independent optimizer state (elastic resume) ---------------------------
    def _adam(self):
        """The torch (CPU) or DeepSpeed (GPU) Adam that ZeRO-1/2 wrap around this rank's flat
        fp32 partitions: one tensor per param group, moments in its state."""
        if self.zero_stage not in (1, 2):
            raise ValueError(f"a whole-state checkpoint covers ZeRO stages 1 and 2, not {self.zero_stage}")
        return self.optimizer.optimizer

    def _moment_pieces(self, key: str) -> dict[str, torch.Tensor]:
        """This rank's pieces of AdamW's moment `key`, laid out like `master_pieces`."""
        adam = self._adam()
        pieces = {}
        for name, parameter in self.named_parameters():
            mapping = parameter._hp_mapping
            if mapping is None:
                pieces[name] = torch.empty(0, device=self.device)
                continue
            flat = adam.param_groups[mapping.param_group_index]["params"][0]
            address = mapping.hp_fragment_address
            pieces[name] = adam.state[flat][key].narrow(0, address.start, address.numel)
        return pieces

    def whole_state(self) -> dict[str, torch.Tensor] | None:
        """The fp32 master weights and AdamW's moments and step, whole, on rank 0 (None
        elsewhere): "weight/NAME", "exp_avg/NAME", "exp_avg_sq/NAME", "step". Any world size can
        load it (`load_whole_state`). ZeRO-1/2 after at least one step; every rank must call it."""
        adam = self._adam()
        whole = {}
        masters = {name: piece for name, piece, _ in self.master_pieces()}
        for key, pieces in (("weight", masters), *((k, self._moment_pieces(k)) for k in ADAM_MOMENTS)):
            gathered = self.gather(pieces)
            if gathered is not None:
                whole.update({f"{key}/{name}": tensor for name, tensor in gathered.items()})
        steps = {int(state["step"]) for state in adam.state.values()}
        if len(steps) != 1:
            raise RuntimeError(f"the optimizer's partitions disagree on the step count ({sorted(steps)})")
        return {**whole, "step": torch.tensor(steps.pop())} if self.rank == 0 else None

    def load_whole_state(self, whole: dict[str, torch.Tensor]) -> None:
        """Set this rank's partitions from `whole_state()`'s tensors, whatever world size wrote
        them: fp32 masters, AdamW moments and step, and the module's (bf16 or fp32) copy of the
        weights, which DeepSpeed would otherwise refresh only at the next step."""
        from deepspeed.ops.adam import FusedAdam

        adam = self._adam()
        step = int(whole["step"])
        for group in adam.param_groups:  # Adam creates its state lazily at the first step
            flat = group["params"][0]
            # DeepSpeed's fused Adam (GPU) counts in an int, torch's AdamW in a float tensor
            count = step if isinstance(adam, FusedAdam) else torch.tensor(float(step))
            adam.state[flat] = {"step": count, **{key: torch.zeros_like(flat) for key in ADAM_MOMENTS}}
        with torch.no_grad():
            for key, pieces in (
                ("weight", {name: piece for name, piece, _ in self.master_pieces()}),
                *((k, self._moment_pieces(k)) for k in ADAM_MOMENTS),
            ):
                for name, piece in self.pieces_of({n: whole[f"{key}/{n}"] for n in pieces}).items():
                    pieces[name].copy_(piece)
            for name, parameter in self.named_parameters():
                parameter.copy_(whole[f"weight/{name}"])

    def _shapes(self) -> dict[str, torch.Size]:
        return {name: p.ds_shape if hasattr(p, "ds_id") else p.shape for name, p in self.named_parameters()}

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
