"""The ELIS job end to end: its parameters cell, a papermill run, the CLI, and refused input (a malformed trace line,
an empty trace file, an encoder that cannot be loaded offline, a head-shape mismatch on resume), resuming through core
(a run folder, 'latest'), and core's listing of an ELIS run's checkpoints."""
import json
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
    assert len(json.loads((run/'training_history.json').read_text())) == 3
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
    assert [h['epoch'] for h in json.loads((run/'training_history.json').read_text())] == [1, 2, 3, 4]
    with pytest.raises(Exception, match=r'its head has 3 layers x 64 on two 384-d embeddings, this job asks for 8 layers x 64'):
        train_elis(ELISJob(**{**SMALL, 'num_layers': 8, 'resume_from_checkpoint': str(run)}), quiet=True)
    # 'latest' finds this run (the newest ELIS run of the same data and settings in the runs folder); the old name `resume` still works
    r3 = train_elis(ELISJob(**{**SMALL, 'num_train_epochs': 5, 'early_stopping_patience': 0, 'resume': 'latest', 'simulate': False}), quiet=True)
    assert r3.run_dir == run and r3['epochs_run'] == 5
    assert [json.loads(l)['from_epoch'] for l in (run/'resumes.jsonl').read_text().splitlines()] == [3, 4]
    with pytest.raises(Exception, match="found no checkpoint of a ELISJob run"):
        train_elis(ELISJob(**{**SMALL, 'n_requests': 151, 'resume_from_checkpoint': 'latest'}), quiet=True)

def test_checkpoints_listed_by_core(runs_dir, cache_dir):
    "core's list_checkpoints lists an ELIS run's best_model.pt and latest_model.pt, readable, with their epochs."
    from llmwb.elis import ELISJob, train_elis
    from llmwb.core import list_checkpoints
    r = train_elis(ELISJob(**{**SMALL, 'n_requests': 60, 'num_train_epochs': 2, 'simulate': False}), quiet=True)
    cks = {c['name']: c for c in list_checkpoints(r.run_dir)}
    assert sorted(cks) == ['best_model.pt', 'latest_model.pt']
    assert all(c['ok'] and c['problem'] is None for c in cks.values())
    assert (cks['latest_model.pt']['step'], cks['latest_model.pt']['resumable'], cks['best_model.pt']['resumable']) == (2, True, False)
    hist = json.loads((r.run_dir/'training_history.json').read_text())
    assert (cks['best_model.pt']['val_loss'], cks['latest_model.pt']['val_loss']) == (r['best_val_loss'], hist[-1]['val_loss'])

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
