"""Apply model parallelism to the single-device FM: planner + DMP + fused sparse optimizer.

The one place that knows about sharding (the model files know nothing of it):

1. the embedding tables get their optimizer *fused into backward* (RowWiseAdagrad by default;
   FBGEMM's CPU kernels have no Adam);
2. the TorchRec planner picks table-wise / column-wise sharding per table within the allowed
   types (row-wise pooled tables and data-parallel sequence tables are broken on CPU, so only the
   configured types are offered);
3. `DistributedModelParallel` shards the tables and wraps the dense rest in DDP, whose gradient
   all-reduce is switched from mean to *sum*: the loss on each rank is already its share of the
   global-batch mean, which is what TorchRec's embedding all-to-all sums too, so dense and sparse
   gradients equal the single-process gradient for the same global batch;
4. the weights of the single-device model (seeded, built identically on every rank) are copied
   into the shards, so the initial model does not depend on the world size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import (EmbeddingModuleShardingPlan, EnumerableShardingSpec, ParameterSharding,
                                        ShardingEnv, ShardingPlan, ShardMetadata)
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from loopfm.fm.config import OptimizerConfig, ParallelConfig
from loopfm.fm.model import FoundationModel

SPARSE_OPTIMIZERS = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}


def parallelize(model: FoundationModel, cfg: ParallelConfig, opt: OptimizerConfig, device: torch.device,
                plan: dict | None = None, pg: dist.ProcessGroup | None = None) -> DistributedModelParallel:
    """Shard ``model`` over the default (or given) process group; returns the DMP model.

    ``plan`` (from `plan_to_json`) reuses an earlier plan instead of planning: the planner breaks
    ties by Python's per-process hash order, so a resumed run must reuse the plan its
    checkpoint's shards were cut by.
    """
    pg = pg or dist.GroupMember.WORLD
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tables = [m for m in (model.ebc, model.ec) if m is not None]
    apply_optimizer_in_backward(SPARSE_OPTIMIZERS[opt.sparse], [p for m in tables for p in m.parameters()],
                                {"lr": opt.sparse_lr})
    world = dist.get_world_size(pg)
    planner = make_planner(model, cfg, device, Topology(world_size=world, local_world_size=world,
                                                        compute_device=device.type))
    sharders = get_default_sharders()
    sharding_plan = plan_from_json(plan, device) if plan else planner.collective_plan(model, sharders, pg)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg), device=device,
                                   plan=sharding_plan, sharders=sharders)
    ddp = dmp._dmp_wrapped_module
    if isinstance(ddp, nn.parallel.DistributedDataParallel):
        ddp.register_comm_hook(None, _allreduce_sum)
    copy_full_state(dmp, full)
    return dmp


def make_planner(model: FoundationModel, cfg: ParallelConfig, device: torch.device, topology: Topology,
                 batch_size: int | None = None) -> EmbeddingShardingPlanner:
    """The planner of ``model``'s tables on ``topology``, limited to the configured sharding types
    and the fused kernels (`loopfm plan` calls it too, without a process group)."""
    constraints = {t.name: ParameterConstraints(sharding_types=_allowed(cfg, device, pooled=True),
                                                compute_kernels=["fused"]) for t in model.layout.ebc_tables}
    constraints.update({t.name: ParameterConstraints(sharding_types=_allowed(cfg, device, pooled=False),
                                                     compute_kernels=["fused"]) for t in model.layout.ec_tables})
    return EmbeddingShardingPlanner(topology=topology, constraints=constraints, batch_size=batch_size)


def _allowed(cfg: ParallelConfig, device: torch.device, pooled: bool) -> list[str]:
    """The configured sharding types minus those TorchRec cannot run here."""
    types = list(cfg.sharding_types)
    if device.type == "cpu" and pooled:  # FBGEMM has no CPU row-wise pooled kernel
        types = [t for t in types if t not in ("row_wise", "table_row_wise")]
    if not types:
        raise ValueError(f"fm.parallel.sharding_types={cfg.sharding_types}: none of them can shard the "
                         "pooled tables on CPU; add table_wise or column_wise")
    return types


def _allreduce_sum(group, bucket):  # no annotations: DDP checks them, and they are strings here
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def copy_full_state(dmp: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy unsharded tensors into the (possibly sharded) state of ``dmp``, in place."""
    with torch.no_grad():
        for key, value in dmp.state_dict().items():
            src = full[key]
            if hasattr(value, "local_shards"):
                for shard in value.local_shards():
                    index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets,
                                                                  shard.metadata.shard_sizes))
                    shard.tensor.copy_(src[index])
            else:
                value.copy_(src)


def plan_summary(dmp: DistributedModelParallel) -> dict[str, str]:
    """``{table: "sharding_type ranks=[...]"}`` for logs and the run record."""
    return plan_summary_from(dmp.plan)


def plan_summary_from(plan: ShardingPlan) -> dict[str, str]:
    return {table: f"{spec.sharding_type} ranks={spec.ranks}"
            for module_plan in plan.plan.values() for table, spec in module_plan.items()}


def plan_to_json(dmp: DistributedModelParallel) -> dict:
    """The sharding plan as plain data (JSON), enough to rebuild it with `plan_from_json`."""
    out: dict = {}
    for path, module_plan in dmp.plan.plan.items():
        tables = out[path] = {}
        for table, ps in module_plan.items():
            shards = [{"offsets": list(m.shard_offsets), "sizes": list(m.shard_sizes), "rank": m.placement.rank()}
                      for m in (ps.sharding_spec.shards if ps.sharding_spec is not None else [])]
            tables[table] = {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel,
                             "ranks": ps.ranks, "shards": shards}
    return out


def plan_from_json(data: dict, device: torch.device) -> ShardingPlan:
    plan = {}
    for path, tables in data.items():
        module_plan = EmbeddingModuleShardingPlan()
        for table, p in tables.items():
            spec = EnumerableShardingSpec([
                ShardMetadata(shard_offsets=s["offsets"], shard_sizes=s["sizes"],
                              placement=_placement(s["rank"], device))
                for s in p["shards"]]) if p["shards"] else None
            module_plan[table] = ParameterSharding(sharding_type=p["sharding_type"],
                                                   compute_kernel=p["compute_kernel"],
                                                   ranks=p["ranks"], sharding_spec=spec)
        plan[path] = module_plan
    return ShardingPlan(plan)


def _placement(rank: int, device: torch.device) -> str:
    if device.type == "cuda":  # one GPU per local rank
        return f"rank:{rank}/cuda:{rank % torch.cuda.device_count()}"
    return f"rank:{rank}/{device.type}"
