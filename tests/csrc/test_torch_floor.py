"""setup.py's torch lower bound is the newest torch API the package uses, and every use is dated.

An AST walk over megatron_evomoe/, kernels/ and csrc/*.py collects every torch name used (import
aliases resolved: ``dist.all_reduce`` -> ``torch.distributed.all_reduce``) and every keyword passed
to one (``name(kw=)``). Each must be in ``FIRST_RELEASE`` (dated by the torch release that first
has it); a new name or keyword fails here until someone dates it, and the bound in setup.py must
be the newest date. Names newer than the bound are allowed only in ``GUARDED``'s file, behind a
fallback. Not seen by the walk: methods of objects (``tensor.foo()``, ``op.register_fake``, which
comes with ``custom_op``) and positional arguments (``is_autocast_enabled(device_type)``, dated
by hand below).
"""
import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "megatron_evomoe").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"),
                  *(ROOT / "csrc").glob("*.py")])

# Every torch name and keyword the package uses, by the first torch release that has it. "2.1" means
# "2.1 or older": the floor question starts there.
FIRST_RELEASE = {
    "2.1": """
        torch torch.Generator torch.Size torch.Tensor torch.__version__ torch._assert_async torch.arange
        torch.argsort torch.autocast torch.autograd.Function torch.autograd.backward
        torch.backends.cuda.matmul.allow_tf32 torch.bfloat16 torch.bincount torch.bool torch.cat
        torch.compiler.assume_constant_result torch.cuda.current_device torch.cuda.device_count
        torch.cuda.get_device_capability torch.cuda.is_current_stream_capturing
        torch.cuda.Event torch.cuda.current_stream torch.distributed.P2POp torch.distributed.batch_isend_irecv
        torch.cuda.get_device_name torch.cuda.get_device_properties torch.cuda.get_rng_state_all
        torch.cuda.is_available torch.cuda.set_device torch.cuda.set_rng_state_all torch.cumsum torch.device
        torch.distributed torch.distributed.PrefixStore torch.distributed.ReduceOp.MAX
        torch.distributed.ReduceOp.MIN torch.distributed.ReduceOp.SUM torch.distributed.TCPStore
        torch.distributed.all_gather torch.distributed.all_gather_object torch.distributed.all_reduce
        torch.distributed.all_to_all_single torch.distributed.barrier torch.distributed.broadcast
        torch.distributed.destroy_process_group torch.distributed.get_backend
        torch.distributed.get_process_group_ranks torch.distributed.get_rank torch.distributed.get_world_size
        torch.distributed.init_process_group torch.distributed.irecv torch.distributed.is_initialized
        torch.distributed.isend torch.distributed.new_group torch.div torch.dtype torch.einsum torch.empty
        torch.empty_like torch.equal torch.float16 torch.float32 torch.float64 torch.from_numpy torch.full
        torch.full_like torch.gather torch.get_rng_state torch.int32 torch.int64 torch.int8 torch.is_tensor
        torch.isfinite torch.load torch.logsumexp torch.long torch.manual_seed torch.mm torch.mm(out=) torch.multinomial
        torch.nn.Conv2d torch.nn.Embedding torch.nn.GELU torch.nn.Identity torch.nn.LayerNorm torch.nn.Linear
        torch.nn.Module torch.nn.Module.__init__ torch.nn.ModuleList torch.nn.Parameter torch.nn.Sequential
        torch.nn.functional.cosine_similarity torch.nn.functional.cross_entropy torch.nn.functional.embedding
        torch.nn.functional.gelu torch.nn.functional.layer_norm torch.nn.functional.linear
        torch.nn.functional.one_hot torch.nn.functional.pad torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.silu torch.searchsorted torch.searchsorted(right=)
        torch.nn.init.normal_ torch.nn.init.zeros_ torch.nn.utils.clip_grad_norm_ torch.no_grad torch.ones
        torch.ones_like torch.optim.AdamW torch.optim.Optimizer torch.outer torch.promote_types torch.rand
        torch.randn torch.random.fork_rng torch.randperm torch.repeat_interleave torch.rsqrt torch.save
        torch.set_num_threads torch.set_rng_state torch.sigmoid torch.softmax torch.sort torch.stack
        torch.tensor torch.topk torch.uint8 torch.use_deterministic_algorithms torch.utils.cpp_extension
        torch.utils.cpp_extension.BuildExtension torch.utils.cpp_extension.CUDAExtension
        torch.utils.cpp_extension.CUDA_HOME torch.utils.cpp_extension.CppExtension torch.utils.data.Dataset
        torch.utils.data.DataLoader torch.utils.data.DataLoader(batch_size=) torch.utils.data.DataLoader(sampler=)
        torch.utils.data.DataLoader(num_workers=) torch.utils.data.DataLoader(collate_fn=)
        torch.utils.data.DataLoader(pin_memory=) torch.utils.data.DataLoader(prefetch_factor=)
        torch.utils.data.DataLoader(worker_init_fn=) torch.utils.data.DataLoader(multiprocessing_context=)
        torch.is_grad_enabled torch.utils.checkpoint.checkpoint torch.utils.checkpoint.checkpoint(use_reentrant=)
        torch.utils.checkpoint.checkpoint(context_fn=) torch.distributed.all_reduce(async_op=)
        torch.utils.data.DataLoader(generator=)
        torch.utils.data.Sampler torch.utils.tensorboard.SummaryWriter torch.version torch.version.cuda
        torch.where torch.zeros torch.zeros_like torch.unique torch.UntypedStorage
        torch.utils._python_dispatch.TorchDispatchMode torch.utils._pytree.tree_flatten
        torch.Generator(device=) torch.arange(device=) torch.arange(dtype=) torch.argsort(dim=)
        torch.argsort(stable=) torch.autocast(dtype=) torch.autocast(enabled=) torch.bincount(minlength=)
        torch.cuda.Event(enable_timing=) torch.repeat_interleave(output_size=) torch.cat(dim=) torch.distributed.TCPStore(is_master=) torch.distributed.TCPStore(timeout=)
        torch.distributed.TCPStore(wait_for_workers=) torch.distributed.all_gather(group=)
        torch.distributed.all_gather_object(group=) torch.distributed.all_reduce(group=)
        torch.distributed.all_reduce(op=) torch.distributed.all_to_all_single(group=)
        torch.distributed.broadcast(group=) torch.distributed.broadcast(src=)
        torch.distributed.init_process_group(rank=) torch.distributed.init_process_group(store=)
        torch.distributed.init_process_group(timeout=) torch.distributed.init_process_group(world_size=)
        torch.distributed.irecv(tag=) torch.distributed.isend(tag=) torch.distributed.new_group(timeout=)
        torch.div(rounding_mode=) torch.empty(device=) torch.empty(dtype=) torch.empty_like(device=)
        torch.full(dtype=) torch.load(map_location=) torch.load(mmap=) torch.load(weights_only=)
        torch.logsumexp(dim=) torch.multinomial(generator=) torch.nn.Conv2d(stride=) torch.nn.LayerNorm(eps=)
        torch.nn.Linear(bias=) torch.nn.Parameter(requires_grad=) torch.nn.functional.cosine_similarity(dim=)
        torch.nn.functional.cross_entropy(ignore_index=) torch.nn.functional.cross_entropy(reduction=)
        torch.nn.functional.gelu(approximate=) torch.nn.functional.scaled_dot_product_attention(is_causal=)
        torch.nn.functional.scaled_dot_product_attention(attn_mask=)
        torch.ones(device=) torch.ones(dtype=) torch.optim.AdamW(betas=) torch.optim.AdamW(eps=)
        torch.optim.AdamW(foreach=) torch.optim.AdamW(lr=) torch.rand(dtype=) torch.rand(generator=)
        torch.randn(dtype=) torch.randn(generator=) torch.random.fork_rng(devices=) torch.randperm(generator=)
        torch.softmax(dim=) torch.sort(stable=) torch.tensor(device=) torch.tensor(dtype=) torch.topk(dim=)
        torch.use_deterministic_algorithms(warn_only=) torch.zeros(device=) torch.zeros(dtype=)
        torch.utils.cpp_extension.CUDAExtension(extra_compile_args=) torch.utils.cpp_extension.CUDAExtension(optional=)
        torch.utils.cpp_extension.CUDAExtension(sources=) torch.utils.cpp_extension.CppExtension(extra_compile_args=)
        torch.utils.cpp_extension.CppExtension(extra_link_args=) torch.utils.cpp_extension.CppExtension(optional=)
        torch.utils.cpp_extension.CppExtension(sources=)
    """,
    "2.3": "torch.compiler.is_compiling",
    # custom_op brings its methods register_fake / register_autograd; is_autocast_enabled is used
    # with its device_type argument (2.4); AdamW(fused=) runs on CPU too (2.4: CUDA-only before).
    "2.4": """torch.library.custom_op torch.library.custom_op(mutates_args=) torch.get_autocast_dtype
              torch.is_autocast_enabled torch.optim.AdamW(fused=)""",
    # 2.5 also dates the distributed checkpoints' torch.distributed.checkpoint names (parallel/
    # distributed_checkpoint.py, dcp_planners.py, dcp_reading.py): present in 2.5 (dcp.save/load with planners
    # and process_group since 2.2), dated at the floor, their first release not checked further
    "2.5": """torch.OutOfMemoryError torch.serialization.safe_globals torch.serialization.get_unsafe_globals_in_checkpoint
              torch.nn.functional.scaled_dot_product_attention(enable_gqa=)
              torch.sign torch.layout torch.memory_format torch.utils._pytree.tree_map torch.distributed.new_group(backend=)
              torch.distributed.broadcast_object_list torch.distributed.broadcast_object_list(group=)
              torch.distributed.broadcast_object_list(src=)
              torch.distributed.checkpoint.FileSystemReader torch.distributed.checkpoint.FileSystemWriter
              torch.distributed.checkpoint.FileSystemWriter(single_file_per_rank=)
              torch.distributed.checkpoint.FileSystemWriter(sync_files=)
              torch.distributed.checkpoint.default_planner.DefaultLoadPlanner
              torch.distributed.checkpoint.default_planner.DefaultSavePlanner
              torch.distributed.checkpoint.load torch.distributed.checkpoint.load(no_dist=)
              torch.distributed.checkpoint.load(planner=) torch.distributed.checkpoint.load(process_group=)
              torch.distributed.checkpoint.load(storage_reader=)
              torch.distributed.checkpoint.metadata.ChunkStorageMetadata
              torch.distributed.checkpoint.metadata.ChunkStorageMetadata(offsets=)
              torch.distributed.checkpoint.metadata.ChunkStorageMetadata(sizes=)
              torch.distributed.checkpoint.metadata.MetadataIndex
              torch.distributed.checkpoint.metadata.TensorProperties.create_from_tensor
              torch.distributed.checkpoint.planner.LoadPlan torch.distributed.checkpoint.planner.SavePlan
              torch.distributed.checkpoint.planner.TensorWriteData
              torch.distributed.checkpoint.planner.TensorWriteData(chunk=)
              torch.distributed.checkpoint.planner.TensorWriteData(properties=)
              torch.distributed.checkpoint.planner.TensorWriteData(size=)
              torch.distributed.checkpoint.planner.WriteItem torch.distributed.checkpoint.planner.WriteItem(index=)
              torch.distributed.checkpoint.planner.WriteItem(tensor_data=)
              torch.distributed.checkpoint.planner.WriteItem(type=)
              torch.distributed.checkpoint.planner.WriteItemType.BYTE_IO
              torch.distributed.checkpoint.planner.WriteItemType.SHARD
              torch.distributed.checkpoint.planner_helpers._create_read_item_for_byteio
              torch.distributed.checkpoint.planner_helpers.create_read_items_for_chunk_list
              torch.distributed.checkpoint.save torch.distributed.checkpoint.save(no_dist=)
              torch.distributed.checkpoint.save(planner=) torch.distributed.checkpoint.save(process_group=)
              torch.distributed.checkpoint.save(storage_writer=)""",
}
# Newer than the floor: used only in the one file named, behind a hasattr/getattr fallback.
GUARDED = {
    "torch._grouped_mm": ("2.8", "megatron_evomoe/ops/grouped_gemm.py"),  # else a loop of matmuls
    "torch.distributed.all_gather_single": ("2.13", "megatron_evomoe/parallel/flat_collectives.py"),
    "torch.distributed.reduce_scatter_single": ("2.13", "megatron_evomoe/parallel/flat_collectives.py"),
}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _release_of() -> dict[str, str]:
    return {name: release for release, names in FIRST_RELEASE.items() for name in names.split()}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the torch name it stands for, from the file's imports (function-local ones too)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    aliases[alias.asname or "torch"] = alias.name if alias.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "torch":
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def torch_uses(source: str) -> set[str]:
    """Every torch name (longest attribute chain) and `name(kw=)` used in `source`."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    uses = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and node.id in aliases):
            continue
        name, top = aliases[node.id], node
        while isinstance(parents.get(top), ast.Attribute):
            top = parents[top]
            name += "." + top.attr
        uses.add(name)
        call = parents.get(top)
        if isinstance(call, ast.Call) and call.func is top:
            uses.update(f"{name}({kw.arg}=)" for kw in call.keywords if kw.arg)
    return uses


@functools.cache
def _uses_by_file() -> dict[str, set[str]]:
    return {str(path.relative_to(ROOT)): torch_uses(path.read_text(encoding="utf-8")) for path in SOURCES}


def _setup_floor() -> str:
    (floor,) = re.findall(r'"torch>=([0-9.]+)"', (ROOT / "setup.py").read_text(encoding="utf-8"))
    return floor


def test_the_walk_resolves_aliases_attribute_chains_and_keywords():
    source = ("import torch.distributed as dist\nfrom torch import nn\nimport torch.nn.functional as F\n"
              "def f(x):\n    from torch.serialization import safe_globals\n"
              "    dist.all_reduce(x, op=dist.ReduceOp.SUM)\n    return F.silu(nn.Linear(2, 2, bias=False)(x)), safe_globals\n")
    assert torch_uses(source) == {
        "torch.distributed.all_reduce", "torch.distributed.all_reduce(op=)", "torch.distributed.ReduceOp.SUM",
        "torch.nn.functional.silu", "torch.nn.Linear", "torch.nn.Linear(bias=)", "torch.serialization.safe_globals"}


def test_every_torch_use_is_dated():
    known = set(_release_of()) | set(GUARDED)
    undated = sorted({f"{use}  ({path})" for path, uses in _uses_by_file().items() for use in uses - known})
    assert not undated, "date these torch uses in FIRST_RELEASE (or guard them):\n" + "\n".join(undated)


def test_setup_floor_is_the_newest_unguarded_use():
    release_of = _release_of()
    used = set().union(*_uses_by_file().values())
    newest = max((release_of[use] for use in used if use in release_of), key=_version)
    assert _setup_floor() == newest == "2.5"


def test_uses_newer_than_the_floor_stay_in_their_fallback_file():
    floor = _version(_setup_floor())
    for name, (release, home) in GUARDED.items():
        assert _version(release) > floor, f"{name} is not newer than the floor: date it in FIRST_RELEASE"
        outside = sorted(path for path, uses in _uses_by_file().items() if name in uses and path != home)
        assert not outside, f"{name} (torch {release}) used outside its fallback in {home}: {outside}"
        assert name.rsplit(".", 1)[1] in (ROOT / home).read_text(encoding="utf-8")  # the fallback still names it
