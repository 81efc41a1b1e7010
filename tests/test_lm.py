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

# ---- the original trainer's users (issue 24): its command lines, its console output, its data, and --dry_run ----

SEED_TINY = ['--context_length', '32', '--d_model', '32', '--num_layers', '2', '--num_heads', '2', '--batch_size', '8', '--warmup_iters', '2',
             '--eval_interval', '5', '--log_interval', '5', '--checkpoint_interval', '5', '--device', 'cpu', '--val_tokens', '2048',
             '--eval_batches', '2', '--sample_tokens', '0', '--num_threads', '1']

@pytest.fixture
def seed_data(tmp_path, monkeypatch):
    "The original trainer's layout: data/train_tokens.npy, a plain int64 array of ids without a sidecar, in the working folder."
    monkeypatch.chdir(tmp_path)
    (tmp_path/'data').mkdir()
    np.save(tmp_path/'data'/'train_tokens.npy', np.random.default_rng(0).integers(0, 300, 30_000))
    return tmp_path/'data'/'train_tokens.npy'

def test_original_command_lines_parse():
    "The document's example command lines are LMJob configs (aliases and the bare --resume), with the checkpoint file as a folder beside it."
    from llmwb.runs import parse_job_args
    job, dry = parse_job_args(LMJob, ['--train_data', 'data/large_train_tokens.npy', '--val_data', 'data/large_val_tokens.npy', '--vocab_size', '50000',
                                      '--context_length', '2048', '--d_model', '1024', '--num_layers', '24', '--num_heads', '16', '--d_ff', '4096',
                                      '--batch_size', '64', '--learning_rate', '2e-4', '--min_learning_rate', '1e-5', '--weight_decay', '0.1',
                                      '--warmup_iters', '5000', '--max_iters', '500000', '--eval_interval', '1000', '--log_interval', '100',
                                      '--checkpoint_interval', '10000', '--checkpoint_path', 'checkpoints/large_model.pt', '--device', 'cuda',
                                      '--gradient_clip_val', '1.0', '--rope_theta', '10000.0'], 'llmwb lm')
    assert not dry
    assert (job.per_device_train_batch_size, job.warmup_steps, job.max_steps, job.eval_steps, job.logging_steps, job.save_steps, job.max_grad_norm) == \
           (64, 5000, 500000, 1000, 100, 10000, 1.0)
    assert job.checkpoint_path == str(Path.cwd()/'checkpoints'/'large_model')
    job, dry = parse_job_args(LMJob, ['--train_data', 'data/train_tokens.npy', '--resume', '--checkpoint_path', 'checkpoints/model.pt',
                                      '--max_iters', '100000', '--dry_run'], 'llmwb lm')
    assert dry and (job.resume_from_checkpoint, job.max_steps, Path(job.checkpoint_path).name) == ('latest', 100000, 'model')

def test_original_resume_continues_the_run_that_wrote_the_checkpoint_file(env, runs_dir, seed_data, capsys):
    "`--checkpoint_path checkpoints/model.pt` keeps step checkpoints in checkpoints/model/; a second new run there is refused; `--resume` continues the first."
    ck = ['--train_data', 'data/train_tokens.npy', *SEED_TINY, '--checkpoint_path', 'checkpoints/model.pt']
    assert main(['lm', *ck, '--max_iters', '10']) == 0, capsys.readouterr().err
    (run,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    folder = seed_data.parent.parent/'checkpoints'/'model'
    assert sorted(p.name for p in folder.iterdir()) == ['step_000005', 'step_000010'] and not any((run/'checkpoints').iterdir())
    assert [c['step'] for c in list_checkpoints(run)] == [5, 10]      # llmwb checkpoints RUN finds them there
    assert json.loads((run/'metrics.json').read_text())['vocab_size'] == 10_000   # no sidecar: the original's default
    capsys.readouterr()
    assert main(['lm', *ck, '--max_iters', '10']) == 2
    assert 'already holds the checkpoints of an earlier run' in capsys.readouterr().err
    assert main(['lm', '--train_data', 'data/train_tokens.npy', *SEED_TINY, '--resume', '--checkpoint_path', 'checkpoints/model.pt', '--max_iters', '15']) == 0
    m = json.loads((run/'metrics.json').read_text())
    assert (m['resumed_from'], m['steps']) == (10, 15) and [p for p in runs_dir.iterdir() if p.is_dir()] == [run]
    assert sorted(p.name for p in folder.iterdir()) == ['step_000005', 'step_000010', 'step_000015']
    capsys.readouterr()   # resuming it with other model flags names them
    assert main(['lm', '--train_data', 'data/train_tokens.npy', *SEED_TINY, '--d_model', '64', '--resume', '--checkpoint_path', 'checkpoints/model.pt']) == 2
    assert 'different d_model (32, now 64)' in capsys.readouterr().err

def test_console_and_training_log_have_the_original_lines(env, runs_dir, seed_data, capsys):
    "A run prints the original trainer's start-up summary and a line per log interval (Val Loss at evaluations, checkpoints); training.log keeps them; quiet prints nothing."
    assert main(['lm', '--train_data', 'data/train_tokens.npy', *SEED_TINY, '--max_iters', '10']) == 0
    out = capsys.readouterr().out.splitlines()
    (run,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    start = out.index('TRANSFORMER LANGUAGE MODEL TRAINING')
    assert out[start - 1] == out[start + 1] == '=' * 60
    want = ['Loading training data from data/train_tokens.npy...', 'Loaded dataset: 30,000 tokens, dtype: int64, memory-mapped: True',
            'Token range: 0 to 299', 'Initializing TransformerLM with 2 layers, 32 dimensions...', 'Starting training from iteration 0 to 10...',
            'Device: cpu', 'Batch size: 8, Context length: 32', 'Saving checkpoint at iteration 5...', 'Training complete! Saving final checkpoint...']
    assert all(w in out for w in want), [w for w in want if w not in out]
    assert any(l.startswith('Model parameters: ') and l.endswith(' trainable') for l in out)
    iters = [l for l in out if l.startswith('Iter')]
    assert [l[:11] for l in iters] == ['Iter      0', 'Iter      5', 'Iter     10'] and all('| Val Loss: ' in l for l in iters), iters
    assert iters[1].startswith('Iter      5 | Loss: ') and ' | LR: ' in iters[1]
    log = (run/'training.log').read_text().splitlines()
    assert [l for l in log if l.startswith('Iter')] == iters and all(w in log for w in want)
    res = train_lm(LMJob(train_data=str(seed_data), context_length=32, d_model=32, num_layers=1, num_heads=2, max_steps=2, logging_steps=1,
                         eval_batches=1, val_tokens=2048, sample_tokens=0, output_dir=str(runs_dir/'quiet')), quiet=True)
    assert capsys.readouterr().out == ''
    assert sum(l.startswith('Iter') for l in (res.run_dir/'training.log').read_text().splitlines()) == 3

def test_vocab_size_from_a_plain_token_file(env, runs_dir, tmp_path, capsys):
    "No sidecar: vocab_size defaults to the original's 10,000, or the largest id + 1 above it; an explicit vocab_size too small is refused."
    np.save(tmp_path/'big.npy', np.r_[np.arange(5000) % 300, 12_344].astype(np.int64))
    dry = ['lm', '--train_data', str(tmp_path/'big.npy'), '--val_tokens', '1024', '--dry_run']
    assert main(dry) == 0
    assert 'vocab_size: 12,345 (no tokenizer recorded: the largest id 12,344 + 1' in capsys.readouterr().out
    assert main([*dry, '--vocab_size', '10000']) == 2
    err = capsys.readouterr().err
    assert 'holds token id 12344' in err and 'vocab_size is 10000' in err and 'set vocab_size >= 12345' in err

def test_dry_run_resolves_and_writes_nothing(env, runs_dir, seed_data, capsys):
    "--dry_run: the data's facts, the vocabulary, the model, the device (one that is not here is reported, not refused); nothing written; missing data refused."
    import torch
    cmd = ['lm', '--train_data', 'data/train_tokens.npy', '--d_model', '256', '--num_layers', '6', '--num_heads', '8', '--checkpoint_path', 'ck/model.pt',
           '--val_tokens', '2048', '--dry_run']
    before = sorted(p for p in seed_data.parent.parent.rglob('*'))
    assert main([*cmd, '--device', 'cpu' if torch.cuda.is_available() else 'cuda']) == 0
    out = capsys.readouterr().out
    assert f"train_data: data/train_tokens.npy (npy: 30,000 tokens of int64, ids 0 to 299)" in out
    assert "vocab_size: 10,000 (no tokenizer recorded: the original trainer's default" in out
    assert 'model: TransformerLM, 6 layers, d_model 256, 8 heads, d_ff 704: ' in out
    assert f"checkpoints: {seed_data.parent.parent/'ck'/'model'}" in out
    if not torch.cuda.is_available(): assert 'device: cuda (not available here: the run would stop)' in out
    assert sorted(p for p in seed_data.parent.parent.rglob('*')) == before and not any(runs_dir.iterdir())
    assert main(['lm', '--train_data', 'data/nothing.npy', '--dry_run']) == 2
    assert "train_data 'data/nothing.npy' does not exist" in capsys.readouterr().err
