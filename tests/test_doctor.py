"""``doctor()`` on this machine: each check present, its numbers the real ones."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from loky import cpu_count

from mpnb.doctor import LEAK_AGE, Report, doctor, remove_leaked_shm

KEYS = ["python", "gil", "threads", "cpus", "memory", "shm", "blas", "proc_limits", "output"]


def test_report_has_every_check_with_a_verdict():
    report = doctor()
    assert isinstance(report, Report)
    assert [c.key for c in report.checks] == KEYS
    for check in report.checks:
        assert check.verdict in ("ok", "note", "warn"), check
        assert check.found and not check.found.startswith("could not check"), check
        if check.verdict == "warn":
            assert check.advice, check
    text = str(report)
    assert text.splitlines()[0] == "mpnb doctor"
    for check in report.checks:
        assert check.title in text
    html = report._repr_html_()
    assert html.startswith("<table>") and html.count("<tr>") == len(KEYS) + 1


def test_numbers_are_this_machines():
    report = doctor()
    version = ".".join(map(str, sys.version_info[:3]))
    assert f"Python {version}" in report["python"].found
    method = multiprocessing.get_start_method(allow_none=True) or \
        multiprocessing.get_all_start_methods()[0]
    assert f"default start method {method!r}" in report["python"].found
    assert f"machine {os.cpu_count()}" in report["cpus"].found
    assert f"{cpu_count()} usable" in report["cpus"].found
    if hasattr(os, "sched_getaffinity"):
        assert f"affinity {len(os.sched_getaffinity(0))}" in report["cpus"].found
    assert "RLIMIT_NPROC" in report["proc_limits"].found


def test_doctor_picks_no_start_method():
    code = ("import multiprocessing, mpnb.doctor; mpnb.doctor.doctor(); "
            "print(multiprocessing.get_start_method(allow_none=True))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "None"


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_leaked_shared_memory_is_found():
    # a segment named like multiprocessing.shared_memory's, mapped by nobody
    leak = Path("/dev/shm") / f"psm_{uuid.uuid4().hex[:8]}"
    leak.write_bytes(b"\0" * 4096)
    try:
        assert leak.name not in doctor()["shm"].found  # just made: may be in use
        old = time.time() - 2 * LEAK_AGE
        os.utime(leak, (old, old))
        check = doctor()["shm"]
        assert check.verdict == "warn"
        assert leak.name in check.found or "..." in check.found
        assert "remove_leaked_shm()" in check.advice
        assert leak.name in remove_leaked_shm()
        assert not leak.exists()
    finally:
        leak.unlink(missing_ok=True)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_shared_memory_in_use_is_not_a_leak():
    from multiprocessing import shared_memory

    block = shared_memory.SharedMemory(create=True, size=4096)
    try:
        assert block.name.lstrip("/") not in doctor()["shm"].found
    finally:
        block.close()
        block.unlink()


@pytest.mark.kernel
def test_doctor_in_a_kernel_sees_its_threads(kernel):
    reply = kernel.run(
        "import sys, mpnb.doctor\n"
        "report = mpnb.doctor.doctor()\n"
        "print(report)\n"
        "print('watched', bool(getattr(sys.stdout, '_should_watch', False)))\n"
        "report").ok()
    assert "mpnb doctor" in reply.stdout
    threads = next(line for line in reply.stdout.splitlines() if "Threads in" in line)
    assert "IOPub" in threads and "Heartbeat" in threads
    output = next(line for line in reply.stdout.splitlines() if "Worker output" in line)
    if "watched True" in reply.stdout:
        assert "reaches the cell" in output
    else:
        assert "server log" in output
    assert any("text/html" in d for d in reply.displays) or reply.results
