"""Apply model parallelism to the single-device FM: planner + DMP + fused sparse optimizer.

The one place that knows about sharding (the model files know nothing of it):

1. the embedding tables get their optimizer *fused into backward* (RowWiseAdagrad by default;
   FBGEMM's CPU kernels have no Adam);
2. the TorchRec planner picks table-wise / column-wise sharding per table within the allowed
   types (row-wise pooled tables and data-parallel sequence tables are broken on CPU, so only the
   configured types are offered). `build_planner` makes the plan a function of the model, the
   config and the world size only: fixed memory capacities (never measured), and the sharding
   types offered in config order (TorchRec intersects them as Python sets, whose order changes
   with the per-process string hash, so equal-cost types used to win at random);
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
from torchrec.distributed.planner.constants import BATCH_SIZE, DDR_CAP, HBM_CAP
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
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

    ``plan`` (from `plan_to_json`) reuses an earlier plan instead of planning: a resumed run
    reuses the plan its checkpoint's shards were cut by (``plan.json``), whatever the planner
    would say now.
    """
    pg = pg or dist.GroupMember.WORLD
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tables = [m for m in (model.ebc, model.ec) if m is not None]
    apply_optimizer_in_backward(SPARSE_OPTIMIZERS[opt.sparse], [p for m in tables for p in m.parameters()],
                                {"lr": opt.sparse_lr})
    sharders = get_default_sharders()
    if plan:
        sharding_plan = plan_from_json(plan, device)
    else:
        planner = build_planner(model, cfg, device, dist.get_world_size(pg))
        sharding_plan = planner.collective_plan(model, sharders, pg)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg), device=device,
                                   plan=sharding_plan, sharders=sharders)
    ddp = dmp._dmp_wrapped_module
    if isinstance(ddp, nn.parallel.DistributedDataParallel):
        ddp.register_comm_hook(None, _allreduce_sum)
    copy_full_state(dmp, full)
    return dmp


class _OrderedEnumerator(EmbeddingEnumerator):
    """TorchRec's enumerator, but offering sharding types and kernels in the constraint's order
    (TorchRec builds them with a set intersection, in string-hash order, which breaks cost ties
    differently in every process)."""

    def _filter_sharding_types(self, name: str, allowed: list[str], sharder_key: str = "") -> list[str]:
        return _in_order(super()._filter_sharding_types(name, allowed, sharder_key),
                         self._constraint_order(name, "sharding_types"))

    def _filter_compute_kernels(self, name: str, allowed: list[str], sharding_type: str) -> list[str]:
        return _in_order(super()._filter_compute_kernels(name, allowed, sharding_type),
                         self._constraint_order(name, "compute_kernels"))

    def _constraint_order(self, name: str, field: str) -> list[str]:
        constraint = (self._constraints or {}).get(name)
        return list(getattr(constraint, field, None) or [])


def _in_order(values: list[str], order: list[str]) -> list[str]:
    return sorted(values, key=lambda v: (order.index(v) if v in order else len(order), v))


def sharding_constraints(model: FoundationModel, cfg: ParallelConfig,
                         device: torch.device) -> dict[str, ParameterConstraints]:
    """Per table: the configured sharding types that can run on ``device``, fused kernels only."""
    constraints = {t.name: ParameterConstraints(sharding_types=_allowed(cfg, device, pooled=True),
                                                compute_kernels=["fused"]) for t in model.layout.ebc_tables}
    constraints.update({t.name: ParameterConstraints(sharding_types=_allowed(cfg, device, pooled=False),
                                                     compute_kernels=["fused"]) for t in model.layout.ec_tables})
    return constraints


def make_planner(model: FoundationModel, cfg: ParallelConfig, device: torch.device, topology: Topology,
                 batch_size: int | None = None) -> EmbeddingShardingPlanner:
    """The planner of ``model``'s tables on ``topology``, limited to the configured sharding types
    and the fused kernels, offering them in config order (`loopfm plan` calls it too, without a
    process group)."""
    batch_size = batch_size or BATCH_SIZE
    constraints = sharding_constraints(model, cfg, device)
    enumerator = _OrderedEnumerator(topology=topology, batch_size=batch_size, constraints=constraints)
    return EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, enumerator=enumerator,
                                    constraints=constraints)


def build_planner(model: FoundationModel, cfg: ParallelConfig, device: torch.device,
                  world_size: int, local_world_size: int | None = None) -> EmbeddingShardingPlanner:
    """The TorchRec planner for ``model`` on ``world_size`` ranks of ``device``'s type.

    Its plan depends on the model, ``cfg`` and the world size only: the topology has TorchRec's
    fixed default capacities (HBM and DDR per rank, not measured on this machine) and the
    enumerator offers the allowed types in config order. ``parallelize`` plans with it
    collectively; ``.plan(model, get_default_sharders())`` plans in one process (a dry run).
    """
    topology = Topology(world_size=world_size, local_world_size=local_world_size or world_size,
                        compute_device=device.type, hbm_cap=HBM_CAP, ddr_cap=DDR_CAP)
    return make_planner(model, cfg, device, topology)


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
    return sharding_plan_to_json(dmp.plan)


def sharding_plan_to_json(plan: ShardingPlan) -> dict:
    """`plan_to_json` of a plan not yet applied (e.g. from ``build_planner(...).plan``)."""
    out: dict = {}
    for path, module_plan in plan.plan.items():
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
