"""Shared fixtures for llmwb's integration tests (papermill runs, the CLI, exports)."""
import os, sys, subprocess, json, shutil
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`-n auto`) the cores are shared out between the workers, so that N workers running torch
# (and the papermill kernels and CLI processes they start, which inherit the environment) don't each start a
# thread per core. Set before torch is imported; a value the caller set is kept.
_workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
if _workers > 1:
    os.environ.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 1) // _workers)))
NBS = ROOT/'nbs'

@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    "An empty runs root for one test; jobs and their kernels (which inherit the environment) write there."
    d = tmp_path/'runs'; d.mkdir()
    monkeypatch.setenv('LLMWB_RUNS_DIR', str(d))
    return d

@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    "An empty llmwb cache root for one test (LLMWB_CACHE_DIR; jobs, kernels and CLI processes inherit it)."
    d = tmp_path/'caches'; monkeypatch.setenv('LLMWB_CACHE_DIR', str(d)); return d

def parameters_cell(nb:Path) -> str:
    "The source of a job notebook's cell tagged `parameters`."
    cells = json.loads(Path(nb).read_text())['cells']
    return next(''.join(c['source']) for c in cells if 'parameters' in c.get('metadata', {}).get('tags', []))

def check_parameters_cell(nb:Path, cls):
    "The notebook's parameters are exactly `cls`'s fields, with the same defaults, and each has a comment."
    import ast, dataclasses
    src = parameters_cell(nb)
    got = {n.target.id: ast.literal_eval(n.value) for n in ast.parse(src).body if isinstance(n, ast.AnnAssign)}
    want = {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default) for f in dataclasses.fields(cls)}
    assert got == want
    assert all('#' in l for l in src.splitlines() if l.strip())

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

def pytest_addoption(parser):
    parser.addoption('--slow', action='store_true', help="also run the tests marked slow (minutes each; CI leaves them out)")

def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: minutes-long learning checks; run with --slow')
    config.addinivalue_line('markers', 'heavy: a minute or more of training; started first so that parallel workers finish together')

def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda i: 'heavy' not in i.keywords)   # stable: the heavy tests first, each group in file order
    if config.getoption('--slow'): return
    skip = pytest.mark.skip(reason='slow: run with --slow')
    for item in items:
        if 'slow' in item.keywords: item.add_marker(skip)
