"""Ahead-of-time compile of every Triton kernel of this package, with a resource report. No GPU needed.

    python -m megatron_evomoe.kernels.aot [--arch 80 90] [--out report.json] [--kernel NAME ...]
                                          [--exclude NAME ...] [--max-configs N] [--jobs N] [--check] [--list]

Each registered kernel is compiled at every tile configuration it autotunes over, for each arch,
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``. The cubin goes through
the ``cuobjdump`` that ships in the triton wheel: ``-res-usage`` gives registers, stack and local
(spill) bytes, ``-sass`` tells whether HGMMA (wgmma) and UTMALDG (TMA load) instructions were emitted. This is the
only check of compiled code when no GPU is around (CI), so ``--check`` makes the exit status fail on a
compile error, a local-memory spill, shared memory past the arch's per-block limit (which would fail
only at launch), or a missing HGMMA / UTMALDG where the kernel expects one on sm_90.

Registering a kernel (call at import time of the kernel's module; modules of this package are
discovered and imported by this tool)::

    from megatron_evomoe.kernels.aot import register_aot
    register_aot(
        my_kernel,                                  # the @triton.jit function
        {"x_ptr": "*bf16", "n": "i32"},             # runtime args -> triton type string
        [dict(BLOCK=128, num_warps=4, num_stages=2), dict(BLOCK=256, num_warps=8)],
        name="my_kernel", hgmma_expected=False,
    )

``tma_expected``: its loads should be TMA (UTMALDG) on sm_90; ``archs``: the archs it is compiled
for (default all of ``--arch``; e.g. ``(90,)`` for a Hopper-only variant).

Each config dict gives a value to every ``tl.constexpr`` parameter (and may pin a runtime argument
to a constant, e.g. ``stride_xk=1``, as triton's runtime specialisation does; such an argument is
written ``"constexpr"`` in the signature or left out of it), plus optional ``num_warps`` /
``num_stages``. Pointer arguments, and the integer arguments named in ``divisible_by_16``
(default: every non-constant ``stride*`` argument), are compiled as 16-divisible, which is what the
runtime sees for aligned tensors with row lengths that are multiples of 16 elements.

TRITON_INTERPRET=1 turns ``@triton.jit`` functions into interpreter objects at import, so with it
set this tool re-executes itself without it.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas")


@dataclasses.dataclass
class AotKernel:
    name: str
    fn: Any
    signature: dict[str, str]
    configs: list[dict]
    divisible_by_16: tuple[str, ...] | None = None
    hgmma_expected: bool = False
    tma_expected: bool = False
    archs: tuple[int, ...] | None = None


_REGISTRY: dict[str, AotKernel] = {}


def register_aot(kernel, signature: dict[str, str], constexpr_configs: list[dict], *, name: str | None = None,
                 hgmma_expected: bool = False, divisible_by_16: tuple[str, ...] | None = None,
                 tma_expected: bool = False, archs: tuple[int, ...] | None = None) -> None:
    """Add ``kernel`` to the AOT report (see the module docstring for the argument format).

    ``hgmma_expected`` / ``tma_expected``: the kernel's tl.dot should lower to wgmma, its descriptor
    loads to TMA, on sm_90 (checked by --check). ``archs``: compile only for these."""
    key = name or getattr(kernel, "__name__", None) or kernel.fn.__name__
    if not constexpr_configs:
        raise ValueError(f"register_aot({key}): constexpr_configs is empty")
    _REGISTRY[key] = AotKernel(key, kernel, dict(signature), [dict(c) for c in constexpr_configs],
                               None if divisible_by_16 is None else tuple(divisible_by_16), hgmma_expected,
                               tma_expected, None if archs is None else tuple(archs))


def registered() -> dict[str, AotKernel]:
    return dict(_REGISTRY)


def discover() -> list[str]:
    """Import every module of this package so that their register_aot calls run; returns errors."""
    import megatron_evomoe.kernels as pkg

    errors = []
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name == "aot" or mod.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
        except Exception as exc:  # report, do not hide: a kernel module that fails to import is a failure
            errors.append(f"{mod.name}: {type(exc).__name__}: {exc}")
    return errors


def config_label(config: dict) -> str:
    """Short text for a config: tile constexprs (BLOCK_M=128 -> M128) then warps and stages."""
    parts = []
    for k, v in config.items():
        if k in _OPTION_KEYS or isinstance(v, (str, bool)) or not k.isupper():
            continue
        parts.append(f"{k.removeprefix('BLOCK_')}{v}" if k.startswith("BLOCK_") else f"{k}={v}")
    parts += [f"w{config['num_warps']}"] if "num_warps" in config else []
    parts += [f"s{config['num_stages']}"] if "num_stages" in config else []
    return " ".join(parts)


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found in the triton wheel nor on PATH")
    return found


# Largest shared memory one block may use (opt-in maximum), per arch: sm_80 163 KiB, sm_86/89 99 KiB,
# sm_90 227 KiB. Triton checks it only when loading the cubin, i.e. on the GPU.
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _inspect_cubin(cubin: bytes, arch: int) -> dict:
    """Registers / stack / local bytes from ``cuobjdump -res-usage``; HGMMA, UTMALDG from ``-sass`` (sm_90+
    only: wgmma does not exist before, and the SASS dump is the slow part of the report)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        cmd = [_tool("cuobjdump"), "-res-usage"] + (["-sass"] if arch >= 90 else []) + [path]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    m = _RES_RE.search(out)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{out[:2000]}")
    regs, stack, _, local = (int(g) for g in m.groups())
    return dict(registers=regs, stack=stack, local=local, hgmma="HGMMA" in out, tma="UTMALDG" in out)


def compile_one(name: str, config_index: int, arch: int) -> dict:
    """Compile one (kernel, config, arch) and read its resource usage. Returns a report row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = _REGISTRY[name]
    config = spec.configs[config_index]
    row = dict(kernel=name, config=config_label(config), arch=arch, ok=False, error=None,
               hgmma_expected=spec.hgmma_expected and arch >= 90, tma_expected=spec.tma_expected and arch >= 90)
    start = time.perf_counter()
    try:
        fn = spec.fn
        constexprs = {k: v for k, v in config.items() if k not in _OPTION_KEYS}
        signature = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg in spec.signature and spec.signature[arg] != "constexpr":
                signature[arg] = spec.signature[arg]
            else:
                raise ValueError(f"argument {arg!r} of {name} has neither a type nor a constexpr value")
        divisible = spec.divisible_by_16
        if divisible is None:
            divisible = tuple(a for a, t in signature.items() if a.startswith("stride") and t != "constexpr")
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if signature[a].startswith("*") or (a in divisible and signature[a] != "constexpr")}
        options = {k: config[k] for k in _OPTION_KEYS if k in config}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        row.update(_inspect_cubin(compiled.asm["cubin"], arch))
        row["shared"] = int(getattr(compiled.metadata, "shared", 0))
        row["ok"] = True
        row["seconds"] = round(time.perf_counter() - start, 2)
    except Exception as exc:  # a failing config is a result to report, not a crash of the whole report
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return row


def run_report(archs=(80, 90), kernels=None, jobs: int | None = None, exclude=(),
               max_configs: int | None = None, full=()) -> tuple[list[dict], list[str]]:
    """Compile what is registered (after discovery): ``kernels`` (default all) minus ``exclude``, at
    each config (or the first ``max_configs``, except for the kernels in ``full``) for each arch.
    Returns (rows, import errors)."""
    import_errors = discover()
    names = sorted(_REGISTRY) if not kernels else list(kernels)
    unknown = [n for n in [*names, *exclude, *full] if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown kernel(s) {unknown}; registered: {sorted(_REGISTRY)}")
    names = [n for n in names if n not in set(exclude)]
    work = [(n, i, a) for n in names
            for i in range(len(_REGISTRY[n].configs))[:None if n in full else max_configs] for a in archs
            if _REGISTRY[n].archs is None or a in _REGISTRY[n].archs]
    if not work:
        return [], import_errors
    jobs = jobs or min(len(work), os.cpu_count() or 1, 8)
    if jobs <= 1:
        rows = [compile_one(*w) for w in work]
    else:
        import multiprocessing as mp

        # fork: the workers inherit the registry; nothing has been compiled (no MLIR context) yet.
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
            rows = list(pool.map(compile_one, *zip(*work)))
    return rows, import_errors


def problems(rows: list[dict], import_errors: list[str]) -> list[str]:
    """What --check fails on: import or compile errors, local-memory spills, shared memory past the
    arch's limit, missing HGMMA or UTMALDG."""
    out = [f"import failed: {e}" for e in import_errors]
    for r in rows:
        tag = f"{r['kernel']} [{r['config']}] sm_{r['arch']}"
        if not r["ok"]:
            out.append(f"{tag}: compile failed: {r['error']}")
            continue
        # ptxas reports spills under STACK as well as LOCAL: Triton kernels make no calls
        # and no local arrays, so any stack frame is spilled registers.
        if r["local"] > 0 or r["stack"] > 0:
            out.append(f"{tag}: {r['local']} bytes of local memory, {r['stack']} bytes of stack (register spills)")
        if r["hgmma_expected"] and not r["hgmma"]:
            out.append(f"{tag}: no HGMMA (wgmma) instruction in the SASS")
        if r.get("tma_expected") and not r.get("tma"):
            out.append(f"{tag}: no UTMALDG (TMA load) instruction in the SASS")
        limit = MAX_SHARED_BYTES.get(r["arch"])
        if limit is not None and r["shared"] > limit:
            out.append(f"{tag}: {r['shared']} bytes of shared memory, more than sm_{r['arch']}'s {limit}")
    return out


def _mark(row: dict, feature: str) -> str:
    """Table cell for an sm_90 instruction family: n/a before sm_90 (wgmma and TMA start there),
    MISSING where expected."""
    if row["arch"] < 90:
        return "n/a"
    if row.get(f"{feature}_expected"):
        return "yes" if row.get(feature) else "MISSING"
    return "yes" if row.get(feature) else "no"


def format_table(rows: list[dict]) -> str:
    headers = ["kernel", "config", "arch", "regs", "stack", "local", "smem", "HGMMA", "TMA"]
    body = []
    for r in rows:
        r = dict(r, config=r["config"] if len(r["config"]) <= 60 else r["config"][:57] + "...")  # full text in --out
        if r["ok"]:
            body.append([r["kernel"], r["config"], f"sm_{r['arch']}", str(r["registers"]), str(r["stack"]),
                         str(r["local"]), str(r["shared"]), _mark(r, "hgmma"), _mark(r, "tma")])
        else:
            body.append([r["kernel"], r["config"], f"sm_{r['arch']}", "FAILED", "", "", "", r["error"] or ""])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(b) for b in body])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        print("aot: TRITON_INTERPRET is set; re-running without it", file=sys.stderr)
        return subprocess.call([sys.executable, "-m", "megatron_evomoe.kernels.aot", *argv], env=env)
    p = argparse.ArgumentParser(prog="python -m megatron_evomoe.kernels.aot", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions (default: 80 90)")
    p.add_argument("--out", help="also write the rows as JSON to this file")
    p.add_argument("--kernel", nargs="+", help="only these registered kernels")
    p.add_argument("--exclude", nargs="+", default=[], help="skip these registered kernels")
    p.add_argument("--max-configs", type=int, default=None, help="compile only the first N configs of each kernel")
    p.add_argument("--full", nargs="+", default=[], help="with --max-configs: these kernels still at every config")
    p.add_argument("--list", action="store_true", help="print the registered kernel names and exit")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count, max 8)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 on compile errors, spills, shared memory over the limit, missing HGMMA or UTMALDG")
    args = p.parse_args(argv)
    if args.list:
        import_errors = discover()
        for name in sorted(_REGISTRY):
            print(name)
        for err in import_errors:
            print(f"PROBLEM: import failed: {err}", file=sys.stderr)
        return 1 if import_errors else 0
    # Triton 3.9 warns (once per process, so once per worker) that this default will change; pin
    # today's default explicitly, which is also what the runtime compiles with.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows, import_errors = run_report(tuple(args.arch), args.kernel, args.jobs, args.exclude, args.max_configs,
                                     args.full)
    print(format_table(rows))
    found = problems(rows, import_errors)
    for msg in found:
        print(f"PROBLEM: {msg}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(rows=rows, import_errors=import_errors, problems=found, registered=sorted(_REGISTRY)),
                      f, indent=1)
    return 1 if (args.check and found) else 0


if __name__ == "__main__":
    # Run through the importable module, not this __main__ copy: kernel modules register into
    # megatron_evomoe.kernels.aot._REGISTRY.
    from megatron_evomoe.kernels import aot as _aot

    sys.exit(_aot.main())
