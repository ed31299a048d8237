"""Devices and data parallelism: where the student lives, and how torchrun's ranks share a batch.

`resolve_device` picks the device (`device: auto` = CUDA when there is one; under torchrun each rank takes
`cuda:LOCAL_RANK`). `DataParallel` is a no-op in one process; under torchrun it joins the process group (NCCL for a
CUDA student, gloo for a CPU one) and wraps the student in DDP, or shards it with FSDP2 (`parallel: fsdp`).
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from tropd.errors import UserError


def resolve_device(choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("device=cuda but torch sees no CUDA device: use device=cpu (or auto)")
    index = int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {index} but only {torch.cuda.device_count()} CUDA devices: start fewer processes")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


class DataParallel:
    """torchrun: one process per rank, DDP or FSDP2 over gloo (CPU) or NCCL (GPU); a no-op in a single process.

    Each rank trains on its slice of the global batch; the loss is scaled so that the gradient average over ranks
    equals the gradient of the mean over all ranks' tokens, as one process with the global batch would get.
    """

    def __init__(self, global_batch: int, device: torch.device, parallel: str = "ddp", timeout_s: float = 1800,
                 compute_dtype: torch.dtype | None = None):  # fmt: skip
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        # ranks on this machine, which share its cores
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.rank = 0
        self.parallel = parallel
        self.device = device
        self.compute_dtype = compute_dtype  # FSDP2's parameter dtype in forward and backward (None: float32)
        if self.world > 1:
            if global_batch % self.world:
                raise UserError(
                    f"prompts_per_step x samples_per_prompt = {global_batch} must divide by the {self.world} ranks"
                )
            from datetime import timedelta

            import torch.distributed as dist

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
            self.rank = dist.get_rank()

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP2 under torchrun: every rank holds a shard, so every forward is a collective that all ranks run."""
        return self.world > 1 and self.parallel == "fsdp"

    def full_state(self, model, root, optimizer) -> tuple[dict | None, dict]:
        """(model state, optimizer state) for a checkpoint, on CPU on rank 0 (every rank calls: under FSDP a
        collective). The optimizer state is always the full one keyed by parameter names (the state-dict API of
        `torch.distributed.checkpoint`), the same for one process, DDP and FSDP of any world size, so a checkpoint
        resumes under another; the model state is gathered under FSDP, None otherwise (the model's own is whole)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer_state = get_optimizer_state_dict(root, optimizer, options=options)
        return self.full_model_state(model), optimizer_state

    def full_model_state(self, model) -> dict | None:
        """The whole model state on CPU on rank 0 (a collective under FSDP: each tensor gathered and moved to CPU in
        turn, so a device never holds more than its shard and one tensor); None when the model's own is whole."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        seen: set[int] = set()
        for name, param in model.named_parameters(remove_duplicate=False):  # tied weights are saved once, as usual
            if id(param) in seen:
                state.pop(name, None)
            seen.add(id(param))
        return state

    def save_sharded(self, root, optimizer, path) -> None:
        """Every rank writes its shards of the model and optimizer state under `path` with
        `torch.distributed.checkpoint` (a collective): nothing is gathered. Keys are parameter names relative to
        `root`, so that `load_sharded` reads them into any world size, FSDP, DDP or one process."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(root, optimizer)
        with _one_process_is_meant():
            dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=str(path))

    def load_sharded(self, root, optimizer, path) -> None:
        """Read a `save_sharded` checkpoint into this run's model and optimizer, resharded to this world size (each
        rank reads what its shards or whole tensors need)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(root, optimizer)  # the optimizer's state initialised
        state = {"model": model_state, "optim": optimizer_state}
        with _one_process_is_meant():
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def load_optimizer(self, root, optimizer, state: dict) -> None:
        """Load a checkpoint's optimizer state (full, keyed by parameter names), sharded again under FSDP. A
        checkpoint of an earlier version keyed its state by parameter index: it resumes without FSDP only."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if any(isinstance(key, int) for key in state.get("state", {})):
            if self.sharded:
                raise UserError("--resume: this checkpoint was written by an earlier version (optimizer state by "
                                "parameter index), which resumes only without FSDP: resume with parallel=ddp, then "
                                "checkpoint again")  # fmt: skip
            optimizer.load_state_dict(state)
            return
        set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def all_true(self, flag: bool) -> bool:
        """True when `flag` holds on every rank (a collective)."""
        return self.total(0.0 if flag else 1.0) == 0.0

    def wrap(self, module: torch.nn.Module, layers=()) -> torch.nn.Module:
        """`module` ready for data-parallel training: DDP, or FSDP2 with each of `layers` sharded on its own.

        Under FSDP only rank 0 holds weights (`module` loaded from disk); the other ranks pass the same architecture
        on the meta device (`trainer.models.empty_student`): once sharded, each rank's shards are filled from rank
        0's whole state by broadcast, and the buffers (rotary frequencies, which no checkpoint holds) likewise. So
        the weights are read from disk once, and a rank other than 0 never holds more than its shards."""
        if self.world == 1:
            return module
        if self.parallel == "fsdp":
            import torch.distributed as dist
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            whole = module.state_dict() if self.main else {}  # references to the unsharded tensors, kept until filled
            # bf16 runs: parameters gathered and computed in bf16, gradients reduced in float32 (the master weights
            # and optimizer state stay float32 shards)
            mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
            for layer in layers:
                fully_shard(layer, mp_policy=mp)
            sharded = fully_shard(module, mp_policy=mp)
            if not self.main:
                sharded.to_empty(device=self.device)
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(sharded, whole, options=options)
            for buffer in sharded.buffers():
                dist.broadcast(buffer, src=0)
            return sharded
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def total(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t)

    def gather(self, obj) -> list | None:
        """Every rank's `obj` (picklable), in rank order, on rank 0; None on the others (a collective)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_ok(self, ok: bool) -> bool:
        return self.all_true(ok)

    def uniforms(self, generator: torch.Generator, rows: int, width: int) -> torch.Tensor:
        """This rank's U(0, 1) draws for a `rows` x `width` batch: every rank draws the whole global batch's
        (all ranks' rows, at the widest rank's width) and keeps its slice, so that the stochastic trust rule
        marks the same tokens as one process with the global batch would."""
        if self.world == 1:
            return torch.rand((rows, width), generator=generator)
        import torch.distributed as dist

        widest = torch.tensor([width], dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(widest, op=dist.ReduceOp.MAX)
        draws = torch.rand((rows * self.world, int(widest)), generator=generator)
        return draws[self.rank * rows : (self.rank + 1) * rows, :width]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():  # a vLLM rollout engine, shut down first, may have taken it down with it
                dist.destroy_process_group()


@contextlib.contextmanager
def _one_process_is_meant():
    """`torch.distributed.checkpoint` without a process group warns that it assumes one process: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
