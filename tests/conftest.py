"""Shared fixtures for llmwb's integration tests (papermill runs, the CLI, exports)."""
import os, sys, subprocess, json, shutil
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'

@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    "An empty runs root for one test; jobs and their kernels (which inherit the environment) write there."
    d = tmp_path/'runs'; d.mkdir()
    monkeypatch.setenv('LLMWB_RUNS_DIR', str(d))
    return d

def run_cli(*args, env=None, timeout=600, cwd=ROOT):
    "Run the `llmwb` console script; returns the CompletedProcess (text)."
    e = {**os.environ, **(env or {})}
    return subprocess.run([shutil.which('llmwb') or 'llmwb', *args], capture_output=True, text=True, env=e,
                          timeout=timeout, cwd=cwd)

@pytest.fixture(scope='session')
def mirror(tmp_path_factory):
    "The offline fixture mirror of the whole catalogue (generated once per test session)."
    from llmwb.fixtures import write_fixture_mirror
    return write_fixture_mirror(tmp_path_factory.mktemp('data')/'mirror')
