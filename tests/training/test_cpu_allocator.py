"""train.cpu_allocator=caching: freed large tensors are reused without new page faults."""
import subprocess
import sys
import textwrap

import pytest

from megatron_evomoe.config import ConfigError, load_config

PROBE = textwrap.dedent("""
    import resource, sys, torch
    from megatron_evomoe.training.cpu_allocator import use_caching_allocator

    def faults_per_round(rounds=6):
        torch.empty(16 * 2**20).fill_(1.0)  # warm up: 64 MiB, touched, freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            torch.empty(16 * 2**20).fill_(1.0)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds

    system = faults_per_round()
    applied = use_caching_allocator()
    faults_per_round()  # the heap grows to its working size once
    caching = faults_per_round()
    print(system, caching, applied)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="glibc mallopt: Linux only")
def test_caching_allocator_reuses_freed_memory():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    system, caching, applied = out.stdout.split()
    assert applied == "True"
    # 64 MiB touched = 16384 pages of 4 KiB: glibc's mmap path faults on (nearly) all of them every round
    assert float(system) > 8000, out.stdout
    assert float(caching) < float(system) / 4, out.stdout  # measured: 1/6 of the rounds or fewer fault


def test_cpu_allocator_choice_is_validated():
    cfg = load_config(None, ["--stages=[{name: s}]", "--train.cpu_allocator=system"])
    assert cfg.train.cpu_allocator == "system"
    with pytest.raises(ConfigError, match="train.cpu_allocator"):
        load_config(None, ["--stages=[{name: s}]", "--train.cpu_allocator=jemalloc"])
