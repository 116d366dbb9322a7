"""Rank layout and process groups for TP, PP, DP, EP and expert-DP.

One `ParallelState` object is built per process and passed to everything that
communicates (layers, dispatcher, gradient reducer, pipeline schedule); nothing
reads process groups from globals.

Rank layout (Megatron-style): tensor parallel innermost, then data parallel
(with expert parallelism carved out of it, EP inner), then pipeline outermost:

    rank     = (pp_rank * dp + dp_rank) * tp + tp_rank
    dp_rank  = edp_rank * ep + ep_rank           (edp = dp // ep: expert-data-parallel size)

Example: world 8, tp=2, pp=2, ep=2 (so dp = 8 / (2*2) = 2, edp = 1):

    | rank | pp | dp | tp | ep | edp |
    |------|----|----|----|----|-----|
    |  0   | 0  | 0  | 0  | 0  |  0  |
    |  1   | 0  | 0  | 1  | 0  |  0  |
    |  2   | 0  | 1  | 0  | 1  |  0  |
    |  3   | 0  | 1  | 1  | 1  |  0  |
    |  4   | 1  | 0  | 0  | 0  |  0  |
    |  5   | 1  | 0  | 1  | 0  |  0  |
    |  6   | 1  | 1  | 0  | 1  |  0  |
    |  7   | 1  | 1  | 1  | 1  |  0  |

Groups (each a set of ranks that differ in one coordinate only):
  TP {0,1} {2,3} {4,5} {6,7}; DP {0,2} {1,3} {4,6} {5,7}; PP {0,4} {1,5} {2,6} {3,7};
  EP = DP ranks sharing edp_rank (here the DP groups); expert-DP = DP ranks sharing ep_rank
  (here singletons). TP innermost keeps the chattiest collectives on the fastest links
  (NVLink inside a node), EP next so that the all-to-all stays inside a node where it can.

Dense parameters are replicated over DP (gradients all-reduced there); expert parameters
are sharded over EP and replicated over expert-DP (gradients all-reduced there).
"""
from __future__ import annotations

import itertools
from datetime import timedelta
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import ConfigError


@dataclass(frozen=True)
class RankLayout:
    """Pure arithmetic of the rank layout (no processes needed)."""
    world_size: int
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self):
        for name in ("world_size", "tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        if self.world_size % (self.tp * self.pp):
            raise ConfigError(f"parallel.tp: tp * pp = {self.tp} * {self.pp} = {self.tp * self.pp} does not divide "
                              f"the world size {self.world_size} (tp * pp * dp must equal the number of processes)")
        if self.dp % self.ep:
            raise ConfigError(f"parallel.ep: {self.ep} must divide the data-parallel size dp = world / (tp * pp) = "
                              f"{self.world_size} / ({self.tp} * {self.pp}) = {self.dp} (EP is carved out of DP)")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: replicas of each expert shard."""
        return self.dp // self.ep

    # ---- coordinates <-> rank
    def rank_of(self, pp: int, dp: int, tp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    def coords(self, rank: int) -> dict:
        """rank -> {'pp', 'dp', 'tp', 'ep', 'edp'}."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside [0, {self.world_size})")
        tp = rank % self.tp
        dp = (rank // self.tp) % self.dp
        pp = rank // (self.tp * self.dp)
        return {"pp": pp, "dp": dp, "tp": tp, "ep": dp % self.ep, "edp": dp // self.ep}

    # ---- groups: lists of global ranks, in a fixed order so every rank builds them identically
    def tp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t) for t in range(self.tp)]
                for p, d in itertools.product(range(self.pp), range(self.dp))]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t) for d in range(self.dp)]
                for p, t in itertools.product(range(self.pp), range(self.tp))]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t) for p in range(self.pp)]
                for d, t in itertools.product(range(self.dp), range(self.tp))]

    def ep_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, e * self.ep + i, t) for i in range(self.ep)]
                for p, t, e in itertools.product(range(self.pp), range(self.tp), range(self.edp))]

    def expert_dp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, e * self.ep + i, t) for e in range(self.edp)]
                for p, t, i in itertools.product(range(self.pp), range(self.tp), range(self.ep))]

    def stage_groups(self) -> list[list[int]]:
        """All ranks of one pipeline stage (TP x DP)."""
        return [[self.rank_of(p, d, t) for d in range(self.dp) for t in range(self.tp)] for p in range(self.pp)]

    def groups(self, kind: str) -> list[list[int]]:
        return getattr(self, f"{kind}_groups")()


GROUP_KINDS = ("tp", "dp", "pp", "ep", "expert_dp", "stage")


def validate_parallel(cfg, world_size: int) -> RankLayout:
    """Check the parallel section against the model and the world size; ConfigError names the field."""
    p, m = cfg.parallel, cfg.model
    layout = RankLayout(world_size, p.tp, p.pp, p.ep)
    for name in ("num_heads", "num_kv_heads", "ffn_hidden_size"):
        if getattr(m, name) % p.tp:
            raise ConfigError(f"parallel.tp: {p.tp} does not divide model.{name}={getattr(m, name)} "
                              "(attention heads and FFN columns are split over TP ranks)")
    if cfg.moe.num_experts % p.ep:
        raise ConfigError(f"parallel.ep: {p.ep} does not divide moe.num_experts={cfg.moe.num_experts}")
    if p.pp > m.num_layers:
        raise ConfigError(f"parallel.pp: {p.pp} pipeline stages but model.num_layers={m.num_layers} "
                          "(every stage needs at least one decoder layer)")
    if p.pp > 1 and m.tie_embeddings:
        raise ConfigError("model.tie_embeddings: tied embeddings are not supported with parallel.pp > 1 "
                          "(the embedding and the LM head live on different stages)")
    return layout


@dataclass
class ParallelState:
    """This process's place in the layout and its process groups.

    A group attribute is None when that dimension has size 1 (collectives on it
    are no-ops); `world_size == 1` needs no torch.distributed at all.
    """
    layout: RankLayout
    rank: int = 0
    sequence_parallel: bool = False
    groups: dict = field(default_factory=dict)  # kind -> ProcessGroup | None
    group_ranks: dict = field(default_factory=dict)  # kind -> list of global ranks of this rank's group

    # ---- construction
    @classmethod
    def single(cls, cfg=None) -> "ParallelState":
        """The trivial state of a one-process run (`cfg` is accepted for the callers' symmetry with build)."""
        st = cls(RankLayout(1), 0)
        for kind in GROUP_KINDS:
            st.groups[kind], st.group_ranks[kind] = None, [0]
        return st

    @classmethod
    def build(cls, cfg, rank: int | None = None, world_size: int | None = None) -> "ParallelState":
        """Validate `cfg.parallel` and create every process group (collective: call on all ranks)."""
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
        layout = validate_parallel(cfg, world_size)
        st = cls(layout, rank, sequence_parallel=bool(cfg.parallel.sequence_parallel and layout.tp > 1))
        if world_size > 1 and not dist.is_initialized():
            raise RuntimeError("ParallelState.build: torch.distributed is not initialised "
                               "(use megatron_evomoe.parallel.launch.init_distributed)")
        timeout = timedelta(seconds=cfg.parallel.timeout_s)
        for kind in GROUP_KINDS:
            st.groups[kind], st.group_ranks[kind] = None, [rank]
            for ranks in layout.groups(kind):
                # new_group must be entered by every rank for every group, members or not
                # (size-1 groups are skipped identically everywhere: nothing to talk to).
                # (new_group does not inherit init_process_group's timeout: pass parallel.timeout_s)
                pg = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None
                if rank in ranks:
                    st.groups[kind], st.group_ranks[kind] = pg, ranks
        return st

    # ---- sizes and ranks
    @property
    def world_size(self) -> int:
        return self.layout.world_size

    def _c(self, key: str) -> int:
        return self.layout.coords(self.rank)[key]

    tp_size = property(lambda self: self.layout.tp)
    pp_size = property(lambda self: self.layout.pp)
    dp_size = property(lambda self: self.layout.dp)
    ep_size = property(lambda self: self.layout.ep)
    expert_dp_size = property(lambda self: self.layout.edp)
    tp_rank = property(lambda self: self._c("tp"))
    pp_rank = property(lambda self: self._c("pp"))
    dp_rank = property(lambda self: self._c("dp"))
    ep_rank = property(lambda self: self._c("ep"))
    expert_dp_rank = property(lambda self: self._c("edp"))

    tp_group = property(lambda self: self.groups["tp"])
    pp_group = property(lambda self: self.groups["pp"])
    dp_group = property(lambda self: self.groups["dp"])
    ep_group = property(lambda self: self.groups["ep"])
    expert_dp_group = property(lambda self: self.groups["expert_dp"])
    stage_group = property(lambda self: self.groups["stage"])

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp_rank: int) -> int:
        """Global rank of the rank holding the same (dp, tp) slot on pipeline stage `pp_rank`."""
        return self.group_ranks["pp"][pp_rank]

    def describe(self) -> str:
        c = self.layout.coords(self.rank)
        return (f"rank {self.rank}/{self.world_size}: pp {c['pp']}/{self.pp_size} dp {c['dp']}/{self.dp_size} "
                f"tp {c['tp']}/{self.tp_size} ep {c['ep']}/{self.ep_size} edp {c['edp']}/{self.expert_dp_size}"
                + (" +SP" if self.sequence_parallel else ""))


def layout_table(layout: RankLayout) -> str:
    """The rank table of the module docstring, for any layout (printed by launchers' dry runs)."""
    rows = ["| rank | pp | dp | tp | ep | edp |", "|------|----|----|----|----|-----|"]
    for r in range(layout.world_size):
        c = layout.coords(r)
        rows.append(f"| {r:>4} | {c['pp']:>2} | {c['dp']:>2} | {c['tp']:>2} | {c['ep']:>2} | {c['edp']:>3} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------
# What each tensor's shard is
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSpec:
    """How one parameter or buffer of a parallel module relates to the full tensor.

    tp_dim: dim split in contiguous chunks over the TP group (None: replicated over TP);
    full_size: the unpadded full length along tp_dim (the vocabulary is padded to a multiple of tp);
    ep_dim: dim split over the EP group (the expert dim of expert weights);
    expert: an expert weight: its gradient is reduced over expert-DP instead of DP.
    Parallel modules keep `_shard_specs = {local name: ShardSpec}`; tensors without one are
    replicated over TP and EP.
    """
    tp_dim: int | None = None
    full_size: int | None = None
    ep_dim: int | None = None
    expert: bool = False


REPLICATED = ShardSpec()


def named_shard_specs(model: torch.nn.Module) -> dict[str, ShardSpec]:
    """Full dotted name -> ShardSpec for every parameter and buffer that has one."""
    out = {}
    for mod_name, mod in model.named_modules():
        for local, spec in getattr(mod, "_shard_specs", {}).items():
            out[f"{mod_name}.{local}" if mod_name else local] = spec
    return out


def replicas(spec: ShardSpec, state: "ParallelState") -> int:
    """How many ranks of the world hold an identical copy of this tensor's local shard
    (within its pipeline stage): used to count each element once in global norms."""
    tp_copies = 1 if spec.tp_dim is not None else state.tp_size
    if spec.expert:
        return tp_copies * (state.expert_dp_size if spec.ep_dim is not None else state.dp_size)
    return tp_copies * state.dp_size


def comm_device(group=None) -> torch.device:
    """Where a small bookkeeping tensor must live to be reduced over `group`: the current CUDA
    device for NCCL, the CPU for gloo (group None here means the default group)."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_(t: torch.Tensor, group, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default) that is a no-op on a trivial group."""
    if group is not None:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t
