"""The from-scratch trainer: exact resume after SIGKILL, the console script's flags, clear errors, and the job notebook."""
import os, sys, json, time, signal, subprocess, dataclasses, ast
from pathlib import Path
import numpy as np
import pytest

from llmwb.loop import LMJob, train_lm, list_checkpoints, weights_equal
from llmwb.runs import main, orphans
from llmwb.lm import tokenize_to_file
from llmwb.core import ConfigError, DatasetError
from conftest import ROOT, NBS, run_cli

TINY = dict(d_model=32, num_layers=2, num_heads=2, context_length=32, per_device_train_batch_size=8, max_steps=40, warmup_steps=4,
            eval_steps=10, eval_batches=2, save_steps=5, logging_steps=1, val_tokens=4096, num_threads=1,
            sample_tokens=0, save_total_limit=0, dtype='fp32')

@pytest.fixture
def env(tmp_path, monkeypatch, runs_dir):
    monkeypatch.setenv('LLMWB_CACHE_DIR', str(tmp_path/'caches'))
    return {'LLMWB_CACHE_DIR': str(tmp_path/'caches'), 'LLMWB_RUNS_DIR': str(runs_dir), 'PYTHONPATH': str(ROOT)}

def _flags(d): return [a for k, v in d.items() for a in (f'--{k}', str(v))]

def test_sigkill_at_an_arbitrary_step_then_resume_gives_the_same_weights(env, runs_dir):
    ref = train_lm(LMJob(**TINY, output_dir=str(runs_dir/'ref')), quiet=True)   # uninterrupted (and tokenizes the corpus once)
    run = runs_dir/'killed'
    cmd = [sys.executable, '-m', 'llmwb.runs', 'lm', *_flags(TINY), '--output_dir', str(run)]
    p = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    log, t0 = run/'metrics.jsonl', time.time()
    while time.time() - t0 < 120:   # kill between two checkpoints, mid-run
        if log.exists() and any(json.loads(l).get('step', 0) >= 17 for l in log.read_text().splitlines() if l.strip()): break
        if p.poll() is not None: pytest.fail(f"the run ended before it was killed: {p.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL); p.wait()
    steps = [c['step'] for c in list_checkpoints(run)]
    assert steps and max(steps) < 40, steps
    r = subprocess.run([*cmd, '--resume_from_checkpoint', 'latest'], env={**os.environ, **env}, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run/'metrics.json').read_text())
    assert m['resumed_from'] == max(steps) and m['steps'] == 40
    assert weights_equal(run, ref.run_dir)
    assert m['val_loss'] == ref['val_loss']
    logged = [json.loads(l)['step'] for l in (run/'metrics.jsonl').read_text().splitlines() if 'loss' in json.loads(l)]
    assert logged == list(range(1, 41))   # the lines logged after the checkpoint and before the kill are not doubled

ORIGINAL_FLAGS = ('train_data', 'val_data', 'vocab_size', 'context_length', 'd_model', 'num_layers', 'num_heads', 'd_ff', 'rope_theta',
                  'batch_size', 'learning_rate', 'min_learning_rate', 'weight_decay', 'warmup_iters', 'max_iters', 'gradient_clip_val',
                  'eval_interval', 'log_interval', 'checkpoint_interval', 'checkpoint_path', 'resume', 'device')

def test_console_script_has_every_flag_of_the_original_cli():
    "Every flag of the original trainer is a field of LMJob or an alias of one, and the command's --help lists the fields."
    fields = {f.name for f in dataclasses.fields(LMJob)}
    assert all(f in fields or LMJob.aliases().get(f) in fields for f in ORIGINAL_FLAGS)
    assert LMJob(max_iters=7, checkpoint_interval=2, resume='latest').to_dict() == LMJob(max_steps=7, save_steps=2, resume_from_checkpoint='latest').to_dict()
    r = run_cli('lm', '--help')
    assert r.returncode == 0
    for f in ORIGINAL_FLAGS:
        assert f'--{LMJob.aliases().get(f, f)}' in r.stdout, f

def test_clear_errors(env, tmp_path, runs_dir, capsys):
    tokenize_to_file(['some text ' * 50] * 4, tmp_path/'small.bin', 'bytes', progress=False)
    ok = dict(TINY, train_data=str(tmp_path/'small.bin'), val_tokens=64, max_steps=2)
    # ids beyond vocab_size
    with pytest.raises(DatasetError, match='holds token id 256.*vocab_size is 100'): train_lm(LMJob(**{**ok, 'vocab_size': 100}), quiet=True)
    # a context longer than the data
    with pytest.raises(DatasetError, match='context_length=5000'): train_lm(LMJob(**{**ok, 'context_length': 5000, 'val_tokens': 0, 'val_data': str(tmp_path/'small.bin')}), quiet=True)
    # heads that do not divide d_model (from the shell: one line, exit 2)
    assert main(['lm', '--d_model', '100', '--num_heads', '3']) == 2
    assert 'd_model=100 is not divisible by num_heads=3' in capsys.readouterr().err
    assert not any(runs_dir.iterdir())   # nothing was written for any of them
    # resuming with another model
    train_lm(LMJob(**ok, output_dir=str(runs_dir/'a')), quiet=True)
    with pytest.raises(ConfigError, match=r'different num_layers \(2, now 3\)'):
        train_lm(LMJob(**{**ok, 'num_layers': 3}, output_dir=str(runs_dir/'a'), resume_from_checkpoint='latest'), quiet=True)

def _params_cell(nb):
    cells = json.loads(nb.read_text())['cells']
    return next(''.join(c['source']) for c in cells if 'parameters' in c.get('metadata', {}).get('tags', []))

def test_job_notebook_parameters_match_lmjob():
    src = _params_cell(NBS/'train_lm.ipynb')
    got = {n.target.id: ast.literal_eval(n.value) for n in ast.parse(src).body if isinstance(n, ast.AnnAssign)}
    assert got == {f.name: f.default for f in dataclasses.fields(LMJob)}
    assert all('#' in l and '=' not in l.split('#', 1)[1] for l in src.splitlines() if l.strip())

def test_job_notebook_trains_and_shows_curves_and_a_sample(env, runs_dir, tmp_path):
    import papermill as pm
    out = tmp_path/'out.ipynb'
    pm.execute_notebook(str(NBS/'train_lm.ipynb'), str(out), cwd=str(NBS), progress_bar=False,
                        parameters=dict(max_iters=40, eval_interval=20, checkpoint_interval=20, warmup_iters=5, d_model=64, num_layers=2,
                                        num_heads=2, context_length=64, sample_tokens=40))
    (run,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    m = json.loads((run/'metrics.json').read_text())
    assert m['steps'] == 40 and m['val_loss'] < 4.5 and len(m['sample']) > 0
    assert (run/'plots'/'loss.png').exists() and (run/'sample.txt').exists()
    text = out.read_text()
    assert 'image/png' in text and 'step_000040' in text and 'val loss' in text
