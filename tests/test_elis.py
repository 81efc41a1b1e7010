"""The ELIS job end to end: its parameters cell, a papermill run, the CLI, and refused input (a malformed trace line,
an empty trace file, an encoder that cannot be loaded offline, a head-shape mismatch on resume), resuming through core
(a run folder, 'latest'), and core's listing of an ELIS run's checkpoints. The original trainer's users: every flag
of its document, `--checkpoint-dir` and `--resume <dir>/latest_model.pt`, the log interval, epoch checkpoints by
default (pruned), training_history.json in the original's shape, and `--dry_run`."""
import io, json, math, contextlib
from pathlib import Path
import pytest
import papermill as pm
from conftest import ROOT, NBS, run_cli, check_parameters_cell

NB = NBS/'train_elis.ipynb'
SMALL = {'n_requests': 150, 'num_layers': 3, 'hidden': 64, 'learning_rate': 1e-3, 'num_train_epochs': 3, 'sim_requests': 300,
         'sim_loads': [0.8, 0.9]}

def test_parameters_cell_matches_elisjob():
    "The notebook's parameters are exactly ELISJob's fields, with the same defaults (and a comment each)."
    from llmwb.elis import ELISJob
    check_parameters_cell(NB, ELISJob)

def test_notebook_run_and_resume(runs_dir, cache_dir, tmp_path):
    "papermill runs train_elis.ipynb; its folder holds the checkpoints, history, test results, plots and simulation; resume continues it."
    out = tmp_path/'a.ipynb'
    pm.execute_notebook(str(NB), str(out), parameters={**SMALL, 'name': 'first', 'save_every': 1}, cwd=str(NBS), progress_bar=False)
    (run,) = [p for p in runs_dir.iterdir() if p.name.endswith('_first')]
    assert sorted(p.name for p in (run/'checkpoints').iterdir()) == ['best_model.pt', 'checkpoint_epoch_1.pt', 'checkpoint_epoch_2.pt',
                                                                      'checkpoint_epoch_3.pt', 'latest_model.pt']
    res = json.loads((run/'test_results.json').read_text())
    assert {'test_loss', 'test_mae', 'test_rmse', 'test_r2', 'best_epoch', 'best_val_loss'} <= set(res)
    hist = json.loads((run/'training_history.json').read_text())
    assert {len(v) for v in hist.values()} == {3} and hist['epochs'] == [1, 2, 3]
    sim = json.loads((run/'simulation.json').read_text())
    assert {(r['load'], r['policy']) for r in sim} == {(l, p) for l in (0.8, 0.9) for p in ('fcfs', 'sjf', 'isrtf')}
    m = json.loads((run/'metrics.json').read_text())
    assert m['sjf_mean_jct'] <= m['isrtf_mean_jct'] * 1.0001 and m['sjf_mean_jct'] < m['fcfs_mean_jct']
    for f in ('plots/loss.png', 'plots/predicted_vs_true.png', 'plots/scheduling.png', 'config.json', 'tensorboard'): assert (run/f).exists(), f
    assert 'ISRTF cuts mean JCT by' in out.read_text()
    # resume with more epochs: same folder, history continued, embeddings all from the cache
    from llmwb.elis import ELISJob, train_elis
    r2 = train_elis(ELISJob(**{**SMALL, 'num_train_epochs': 4, 'resume_from_checkpoint': str(run), 'simulate': False}), quiet=True)
    assert r2.run_dir == run and r2['texts_encoded'] == 0
    assert json.loads((run/'training_history.json').read_text())['epochs'] == [1, 2, 3, 4]
    with pytest.raises(Exception, match=r'its head has 3 layers x 64 on two 384-d embeddings, this job asks for 8 layers x 64'):
        train_elis(ELISJob(**{**SMALL, 'num_layers': 8, 'resume_from_checkpoint': str(run)}), quiet=True)
    # 'latest' finds this run (the newest ELIS run of the same data and settings in the runs folder); the old name `resume` still works
    r3 = train_elis(ELISJob(**{**SMALL, 'num_train_epochs': 5, 'early_stopping_patience': 0, 'resume': 'latest', 'simulate': False}), quiet=True)
    assert r3.run_dir == run and r3['epochs_run'] == 5
    assert [json.loads(l)['from_epoch'] for l in (run/'resumes.jsonl').read_text().splitlines()] == [3, 4]
    with pytest.raises(Exception, match="found no checkpoint of a ELISJob run"):
        train_elis(ELISJob(**{**SMALL, 'n_requests': 151, 'resume_from_checkpoint': 'latest'}), quiet=True)

def test_checkpoints_listed_by_core(runs_dir, cache_dir):
    "core's list_checkpoints lists an ELIS run's best_model.pt, latest_model.pt and (by default) each epoch's checkpoint, readable, with their epochs."
    from llmwb.elis import ELISJob, train_elis
    from llmwb.core import list_checkpoints
    r = train_elis(ELISJob(**{**SMALL, 'n_requests': 60, 'num_train_epochs': 2, 'simulate': False}), quiet=True)
    cks = {c['name']: c for c in list_checkpoints(r.run_dir)}
    assert sorted(cks) == ['best_model.pt', 'checkpoint_epoch_1.pt', 'checkpoint_epoch_2.pt', 'latest_model.pt']
    assert all(c['ok'] and c['problem'] is None for c in cks.values())
    assert (cks['latest_model.pt']['step'], cks['latest_model.pt']['resumable'], cks['best_model.pt']['resumable']) == (2, True, False)
    assert (cks['checkpoint_epoch_1.pt']['step'], cks['checkpoint_epoch_1.pt']['resumable']) == (1, True)
    hist = json.loads((r.run_dir/'training_history.json').read_text())
    assert (cks['best_model.pt']['val_loss'], cks['latest_model.pt']['val_loss']) == (r['best_val_loss'], hist['val_loss'][-1])

def test_refused_input(runs_dir, cache_dir, tmp_path):
    "A malformed trace line, an empty file, and an encoder that cannot be loaded offline: one clear message each, no run folder."
    from llmwb.elis import ELISJob, train_elis, make_sample_traces, write_traces, TRACE_FILE
    f = tmp_path/'traces'/'m'/TRACE_FILE; f.parent.mkdir(parents=True)
    write_traces(list(make_sample_traces(20)), f)
    lines = f.read_text().splitlines(); lines[4] = lines[4][:-3]
    f.write_text('\n'.join(lines) + '\n')
    with pytest.raises(Exception, match=rf'(?s){TRACE_FILE}:5: not valid JSON.*skip_bad_lines=True'):
        train_elis(ELISJob(**{**SMALL, 'data': str(tmp_path/'traces')}), quiet=True)
    (tmp_path/'empty.jsonl').write_text('\n')
    with pytest.raises(Exception, match='No trace records'): train_elis(ELISJob(**{**SMALL, 'data': str(tmp_path/'empty.jsonl')}), quiet=True)
    with pytest.raises(Exception, match="Encoder 'BAAI/bge-large-en-v1.5' cannot be loaded"):
        train_elis(ELISJob(**{**SMALL, 'encoder': 'BAAI/bge-large-en-v1.5'}), quiet=True)
    assert not list(runs_dir.iterdir())
    # skip_bad_lines trains on the rest and reports the skipped line
    r = train_elis(ELISJob(**{**SMALL, 'data': str(tmp_path/'traces'), 'skip_bad_lines': True, 'num_train_epochs': 1, 'simulate': False}), quiet=True)
    assert r['bad_lines'] == 1

def test_cli(runs_dir, cache_dir):
    "llmwb elis runs the job from the command line."
    r = run_cli('elis', '--n_requests', '60', '--num_layers', '2', '--hidden', '32', '--num_train_epochs', '1', '--simulate', 'False')
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = list(runs_dir.iterdir())
    assert (run/'test_results.json').exists()


# The original trainer's users (issue 24)

SEED_FLAGS = {   # every flag of the ELIS document's argument list, a value for it, and the field it sets to what
    '--data-dir': ('../data', 'data', '../data'), '--max-length': ('256', 'max_length', 256),
    '--bge-model': ('BAAI/bge-base-en-v1.5', 'encoder', 'BAAI/bge-base-en-v1.5'), '--hidden-dim': ('2048', 'hidden', 2048),
    '--num-layers': ('12', 'num_layers', 12), '--no-freeze-bge': (None, 'freeze_encoder', False),
    '--batch-size': ('64', 'per_device_train_batch_size', 64), '--learning-rate': ('5e-5', 'learning_rate', 5e-5),
    '--epochs': ('32', 'num_train_epochs', 32), '--early-stopping': ('3', 'early_stopping_patience', 3),
    '--num-workers': ('8', 'num_workers', 8), '--checkpoint-dir': ('./checkpoints', 'output_dir', './checkpoints'),
    '--resume': ('./checkpoints/latest_model.pt', 'resume_from_checkpoint', './checkpoints/latest_model.pt'),
    '--save-every': ('2', 'save_every', 2), '--seed': ('7', 'seed', 7), '--device': ('cpu', 'device', 'cpu'),
    '--log-interval': ('50', 'logging_steps', 50),
}

def test_seed_flags_in_document():
    "SEED_FLAGS holds every flag the original's document lists, hyphens and all."
    import re
    doc = ROOT.parent/'shared'/'seeds'/'elis-predictor-trainer.md'
    if not doc.exists(): pytest.skip(f'{doc} is not here')
    listed = set(re.findall(r'^- `(--[a-z-]+)`', doc.read_text(), re.M))
    assert listed == set(SEED_FLAGS), listed ^ set(SEED_FLAGS)

@pytest.mark.parametrize('flag', list(SEED_FLAGS))
def test_seed_flag(flag):
    "Each of the original train.py's flags, written as its users wrote it, sets its llmwb field (alone and all together)."
    from llmwb.elis import ELISJob
    from llmwb.runs import parse_job_args
    value, field, want = SEED_FLAGS[flag]
    job, dry = parse_job_args(ELISJob, [flag] + ([value] if value is not None else []), 'llmwb elis')
    assert getattr(job, field) == want and not dry
    every = [a for f, (v, _, _) in SEED_FLAGS.items() for a in ([f] if v is None else [f, v])]
    assert getattr(parse_job_args(ELISJob, every, 'llmwb elis')[0], field) == want

def test_seed_defaults():
    "The original's defaults where llmwb keeps them: an epoch checkpoint every epoch, a log line every 100 batches, batch 16, 16 epochs, lr 1e-4."
    from llmwb.elis import ELISJob
    j = ELISJob()
    assert (j.save_every, j.logging_steps, j.per_device_train_batch_size, j.num_train_epochs, j.learning_rate, j.early_stopping_patience,
            j.max_length, j.hidden, j.num_layers, j.freeze_encoder, j.seed) == (1, 100, 16, 16, 1e-4, 5, 512, 1024, 8, True, 42)
    assert j.save_total_limit == 3   # but only the newest few epoch checkpoints (and the best) stay

def _main(*args):
    "llmwb ARGS in this process: (exit code, stdout, stderr)."
    from llmwb.runs import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = main(list(map(str, args)))
    return rc, out.getvalue(), err.getvalue()

def _tree(*roots) -> set:
    return {(str(p), p.stat().st_size) for r in roots if Path(r).exists() for p in Path(r).rglob('*')}

@pytest.fixture
def traces(tmp_path):
    "The original's data layout: <data-dir>/<model>/vllm_results_training.jsonl."
    from llmwb.elis import make_sample_traces, write_traces, TRACE_FILE
    write_traces(list(make_sample_traces(60)), tmp_path/'data'/'sample'/TRACE_FILE)
    return tmp_path/'data'

def test_dry_run_plan(traces, runs_dir, cache_dir, tmp_path, monkeypatch):
    """--dry_run resolves the encoder (the packaged MiniLM offline), the traces and the device, says what it would use, and
    writes nothing; the original's default encoder is refused offline only because the hub cannot be reached."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1'); monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    rc, out, err = _main('elis', '--data-dir', traces, '--checkpoint-dir', tmp_path/'ck', '--device', 'cuda:7', '--dry_run')
    assert rc == 0, err
    lines = dict(l.split(': ', 1) for l in out.splitlines() if ': ' in l and not l.startswith(' '))
    assert lines['encoder'].startswith('auto, as BAAI/bge-base-en-v1.5 cannot be loaded here: all-MiniLM-L6-v2 (packaged with llmwb')
    assert lines['traces'].startswith(f'{traces}: 1 trace file(s) of sample, ')
    assert lines['device'] == 'cuda:7 (not available here: the run would stop)'
    assert lines['embedding_cache'].startswith(str(cache_dir/'elis_embeddings')) and 'empty' in lines['embedding_cache']
    assert lines['run folder'] == f"{tmp_path/'ck'} (new (output_dir))" and 'nothing was written' in out
    assert _tree(tmp_path) == before
    rc, out, err = _main('elis', '--bge-model', 'BAAI/bge-base-en-v1.5', '--dry_run')
    assert rc == 2 and 'ModelNotFoundError' in err and 'the hub cannot be reached' in err, err
    rc, out, err = _main('elis', '--data-dir', tmp_path/'nothing', '--dry_run')
    assert rc == 2 and 'DatasetNotFoundError' in err and 'does not exist' in err, err
    assert _tree(tmp_path) == before

def test_seed_workflow(traces, runs_dir, cache_dir, tmp_path):
    """The original's way: --checkpoint-dir is the run folder, every epoch leaves checkpoint_epoch_N.pt (the newest
    --save_total_limit and the best kept), --log-interval logs the running loss within epochs, training_history.json is
    the original's dict of lists, and --resume <dir>/latest_model.pt continues the run."""
    ck = tmp_path/'checkpoints'
    seed = ['elis', '--data-dir', traces, '--batch-size', 16, '--learning-rate', '1e-3', '--hidden-dim', 32, '--num-layers', 2,
            '--checkpoint-dir', ck, '--log-interval', 3, '--early-stopping', 0, '--no-simulate']
    rc, out, err = _main(*seed, '--epochs', 3, '--save_total_limit', 1)
    assert rc == 0, err
    res = json.loads((ck/'test_results.json').read_text())
    assert {f.name for f in (ck/'checkpoints').iterdir()} == {'best_model.pt', 'latest_model.pt', 'checkpoint_epoch_3.pt', f"checkpoint_epoch_{res['best_epoch']}.pt"}
    hist = json.loads((ck/'training_history.json').read_text())
    assert {'train_loss', 'train_mae', 'train_rmse', 'val_loss', 'val_mae', 'val_rmse', 'epoch_times'} <= set(hist)
    assert {len(v) for v in hist.values()} == {3} and hist['epochs'] == [1, 2, 3] and min(hist['val_loss']) == res['best_val_loss']
    nb = math.ceil(res['records']['train'] / 16)
    steps = [r['step'] for r in map(json.loads, (ck/'metrics.jsonl').read_text().splitlines()) if 'train_loss' in r]
    assert steps == [(e - 1) * nb + b for e in (1, 2, 3) for b in [*range(3, nb, 3), nb]]   # every 3 batches, and each epoch's end
    assert out.count('  batch ') == 3 * len(range(3, nb, 3)) and f'epoch   1/3  batch     3/{nb}  train loss' in out
    assert (ck/'training.log').read_text().count('  batch ') == 3 * len(range(3, nb, 3))
    rc, out, err = _main(*seed, '--epochs', 4, '--resume', ck/'latest_model.pt')
    assert rc == 0, err
    assert json.loads((ck/'training_history.json').read_text())['epochs'] == [1, 2, 3, 4]
    assert [json.loads(l)['checkpoint'] for l in (ck/'resumes.jsonl').read_text().splitlines()] == [str(ck/'checkpoints'/'latest_model.pt')]
    assert (ck/'checkpoints'/'checkpoint_epoch_4.pt').exists() and not list(runs_dir.iterdir())

def test_fine_tune_with_workers(traces, runs_dir, cache_dir):
    "--no-freeze-bge trains the encoder, its batches tokenized by --num-workers DataLoader workers."
    from llmwb.elis import ELISPredictor, load_predictor
    rc, out, err = _main('elis', '--data-dir', traces, '--no-freeze-bge', '--num-workers', 2, '--epochs', 1, '--max-length', 64,
                         '--hidden-dim', 16, '--num-layers', 2, '--no-simulate')
    assert rc == 0, err
    (run,) = list(runs_dir.iterdir())
    enc0, enc1 = ELISPredictor(num_layers=2, hidden=16).encoder.state_dict(), load_predictor(run).encoder.state_dict()
    assert any(not v.equal(enc0[k]) for k, v in enc1.items()), 'the encoder was not trained'
