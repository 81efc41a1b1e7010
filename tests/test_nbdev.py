"""The notebooks are the source: exports are in sync, notebooks are clean, and every notebook passes nbdev_test."""
import os, sys, shutil, subprocess, filecmp
import pytest
from pathlib import Path
from conftest import ROOT, NBS

def _copy_project(dst):
    for f in ('settings.ini', 'setup.py', 'README.md'): shutil.copy(ROOT/f, dst/f)
    shutil.copytree(NBS, dst/'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints'))
    shutil.copytree(ROOT/'llmwb', dst/'llmwb', ignore=shutil.ignore_patterns('__pycache__'))

def _diff(a, b):
    d = filecmp.dircmp(a, b, ignore=['__pycache__', '.ipynb_checkpoints'])
    out = [f'{a}/{x}' for x in d.left_only + d.right_only + d.diff_files]
    for sub in d.common_dirs: out += _diff(a/sub, b/sub)
    return out

def test_export_and_clean_leave_no_change(tmp_path):
    "nbdev_clean and nbdev_export on a copy of the checkout change nothing under llmwb/ or nbs/."
    _copy_project(tmp_path)
    for cmd in ('nbdev_clean', 'nbdev_export'):
        r = subprocess.run([shutil.which(cmd) or cmd], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    changed = _diff(ROOT/'llmwb', tmp_path/'llmwb') + _diff(ROOT/'nbs', tmp_path/'nbs')
    assert not changed, f"run nbdev_clean && nbdev_export and commit: these differ: {changed}"

@pytest.mark.heavy
def test_nbdev_test_passes_and_tests_notebooks(tmp_path):
    "nbdev_test runs every notebook (CI fails on a failing notebook, and when no notebook was tested)."
    nbs = [p for p in NBS.rglob('*.ipynb') if '.ipynb_checkpoints' not in str(p)]
    assert len(nbs) > 0, "no notebooks found"
    # benchmarks and examples that open run folders write them here, not into the checkout's runs/
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'LLMWB_RUNS_DIR': str(tmp_path/'runs')}
    r = subprocess.run([shutil.which('nbdev_test') or 'nbdev_test', '--do_print', '--timing', '--n_workers', '2'],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=1500)
    print(r.stdout[-5000:]); print(r.stderr[-20000:], file=sys.stderr)
    assert r.returncode == 0, f"nbdev_test failed:\n{r.stderr[-8000:]}"
    tested = [l for l in r.stdout.splitlines() if l.startswith('- Completed')]
    assert len(tested) > 0, "nbdev_test tested no notebook"
    import json
    skipped = [p for p in nbs if 'skip_exec: true' in ''.join(json.loads(p.read_text())['cells'][0]['source'])]
    assert len(tested) == len(nbs) - len(skipped), f"nbdev_test ran {len(tested)} of {len(nbs) - len(skipped)} notebooks"
