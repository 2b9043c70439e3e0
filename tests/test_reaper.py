"""The process-tree reaper shared by the pool and the fresh-interpreter runner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import psutil

from airflow_provider_safeproc.reaper import (
    descendant_pids,
    kill_process_tree_now,
    reap_process_tree,
)
from tests.harness.processes import descendants, processes_tagged, wait_until

# A shell that ignores SIGTERM and starts two sleeps: a tree that needs the SIGKILL step.
STUBBORN_TREE = "trap '' TERM; sleep 60 & sleep 60 & wait"


def _start_tree(env=None) -> subprocess.Popen:
    proc = subprocess.Popen(["sh", "-c", STUBBORN_TREE], env=env)
    assert wait_until(lambda: len(descendant_pids(proc.pid)) == 2, 10)
    return proc


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def test_descendant_pids_agrees_with_psutil():
    proc = _start_tree()
    try:
        assert set(descendant_pids(proc.pid)) == {p.pid for p in descendants(proc.pid)}
        assert proc.pid in descendant_pids()
    finally:
        kill_process_tree_now([proc.pid])
        proc.wait(5)


def test_reap_process_tree_term_then_kill_after_grace():
    proc = _start_tree()
    tree = [proc.pid, *descendant_pids(proc.pid)]
    started = time.monotonic()
    signalled = reap_process_tree(proc.pid, grace=0.3)
    proc.wait(5)
    assert set(tree) <= set(signalled)
    assert all(_gone(pid) for pid in tree)
    assert time.monotonic() - started < 5


def test_reap_without_roots_keeps_the_root():
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])
    try:
        assert wait_until(lambda: descendant_pids(proc.pid), 10)
        reap_process_tree(proc.pid, include_roots=False, grace=0.5)
        assert proc.wait(5) is not None  # its child died, so the shell's wait returned
    finally:
        kill_process_tree_now([proc.pid])
        proc.wait(5)


def test_kill_process_tree_now_from_a_signal_handler():
    proc = _start_tree()
    tree = [proc.pid, *descendant_pids(proc.pid)]
    previous = signal.signal(signal.SIGALRM, lambda *_: kill_process_tree_now([proc.pid]))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        assert proc.wait(10) is not None  # SIGKILLed, or exited as its children died first
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert wait_until(lambda: all(_gone(pid) for pid in tree), 2)


def test_processes_tagged_finds_escaped_processes():
    tag = uuid.uuid4().hex
    env = {**os.environ, "SAFEPROC_REAPER_TAG": tag}
    # The shell exits at once; its sleep is reparented away from us and only the tag finds it.
    subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 &"], env=env, check=True)
    try:
        assert wait_until(lambda: len(processes_tagged("SAFEPROC_REAPER_TAG", tag)) == 1, 5)
    finally:
        for proc in processes_tagged("SAFEPROC_REAPER_TAG", tag):
            proc.kill()
    assert wait_until(lambda: not processes_tagged("SAFEPROC_REAPER_TAG", tag), 5)


def test_parent_death_signal_ends_a_child_when_its_parent_dies():
    code = (
        "import os, signal, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'from airflow_provider_safeproc.reaper import set_parent_death_signal as s; s(); import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    time.sleep(0.5)  # let the child set its death signal
    parent.kill()
    parent.wait(5)
    parent.stdout.close()
    assert wait_until(lambda: _gone(child), 2)
