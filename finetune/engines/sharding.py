"""Where trainer=accelerate keeps the model across its processes, and how that is prepared, checkpointed and gathered.

    Replicated   every process holds the whole model (one process, DDP), or accelerate shards it under its own FSDP or
                 DeepSpeed config (GPUs): accelerate prepares, checkpoints and gathers it
    CpuFsdp      trainer.fsdp=true: accelerate applies FSDP on GPUs only, so CPU processes are sharded here with torch
                 FSDP2 (fully_shard on each transformer block, then the root); model and optimizer shards are
                 checkpointed with torch.distributed.checkpoint beside accelerate's state (RNG, scheduler)
"""

from __future__ import annotations

from pathlib import Path

from finetune import adapters
from finetune.engines import gathered_state_dict

SHARDED = "sharded"  # trainer.fsdp=true: the checkpoint's model and optimizer shards (torch.distributed.checkpoint)


class Replicated:
    sharded = False

    def shard(self, model):
        """The model as the optimizer must see it (FSDP2 replaces the parameters)."""
        return model

    def prepare(self, accelerator, model, optimizer, loader) -> tuple:
        return accelerator.prepare(model, optimizer, loader)

    def save(self, accelerator, model, optimizer, directory: Path) -> None:
        accelerator.save_state(str(directory))

    def load(self, accelerator, model, optimizer, directory: Path) -> None:
        accelerator.load_state(str(directory))

    def full_state_dict(self, accelerator, model) -> dict | None:
        return gathered_state_dict(accelerator, model)


class CpuFsdp(Replicated):
    sharded = True

    def shard(self, model):
        """FSDP2 over the launch's processes: each transformer block (the model's _no_split_modules, as accelerate's
        TRANSFORMER_BASED_WRAP picks them), then the root. Every process starts from rank 0's weights, as under DDP."""
        import torch.distributed as dist
        from torch.distributed.fsdp import FSDPModule, fully_shard

        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
        blocks = set(getattr(adapters.base_model(model), "_no_split_modules", None) or ())
        for module in reversed(list(model.modules())):  # inner blocks before the blocks that hold them
            if type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(model)
        # FSDP allocates its gather buffers at the first unshard; made under inference mode (a base model evaluated
        # before training) they could not be written in training ("inplace update to inference tensor"): make them now
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.unshard()
                module.reshard()
        return model

    def prepare(self, accelerator, model, optimizer, loader) -> tuple:
        # model and optimizer not prepared: accelerate would wrap the model in DDP and checkpoint rank 0's optimizer
        return model, optimizer, accelerator.prepare(loader)

    def save(self, accelerator, model, optimizer, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        accelerator.save_state(str(directory))
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory / SHARDED))

    def load(self, accelerator, model, optimizer, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        accelerator.load_state(str(directory))
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(Path(directory) / SHARDED))  # in place, into this process's shards
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def full_state_dict(self, accelerator, model) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
