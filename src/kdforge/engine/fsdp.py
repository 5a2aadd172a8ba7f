"""FSDP through Accelerate: the plugin a recipe's ``train.fsdp`` section asks for, validated up front."""

from __future__ import annotations

from typing import Any

from kdforge.config import TrainConfig
from kdforge.errors import KdforgeError

SHARDING = {"full": "FULL_SHARD", "shard_grad_op": "SHARD_GRAD_OP", "no_shard": "NO_SHARD",
            "hybrid": "HYBRID_SHARD"}


def fsdp_plugin(t: TrainConfig, cpu: bool) -> Any:
    """Accelerate's FullyShardedDataParallelPlugin for ``train.distributed: fsdp`` (CUDA only)."""
    if cpu:
        raise KdforgeError("train.distributed 'fsdp' needs CUDA GPUs (torch FSDP has no CPU backend here); "
                           "on the CPU use train.distributed: ddp")
    from accelerate import FullyShardedDataParallelPlugin

    cfg = t.fsdp
    if cfg is None:
        from kdforge.config import FsdpConfig

        cfg = FsdpConfig()
    policy = {"transformer": "TRANSFORMER_BASED_WRAP", "size": "SIZE_BASED_WRAP", "none": "NO_WRAP"}[cfg.auto_wrap]
    return FullyShardedDataParallelPlugin(
        sharding_strategy=SHARDING[cfg.sharding], auto_wrap_policy=policy, min_num_params=cfg.min_params,
        cpu_offload=cfg.cpu_offload, use_orig_params=True, sync_module_states=True)


def keep_frozen_whole(acc: Any, method: Any, cfg: Any) -> None:
    """Leave the method's frozen parts (teachers: ``frozen_prefixes``) unsharded unless ``shard_teacher``."""
    plugin = getattr(acc.state, "fsdp_plugin", None)
    if plugin is None or (cfg is not None and cfg.shard_teacher):
        return
    prefixes = tuple(p.rstrip(".") for p in method.frozen_prefixes)
    frozen = [m for name, m in method.named_children() if name in prefixes]
    if frozen:
        plugin.ignored_modules = frozen
