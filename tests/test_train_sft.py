"""The SFT job end to end: the default papermill run, its parameters, scripts, the CLI, and refused input."""
import os, sys, json, time, subprocess, shutil, dataclasses, ast
from pathlib import Path
import pytest
import papermill as pm
from conftest import ROOT, NBS, run_cli

NB = NBS/'train_sft.ipynb'

def _params_cell():
    nb = json.loads(NB.read_text())
    return next(''.join(c['source']) for c in nb['cells'] if 'parameters' in c.get('metadata', {}).get('tags', []))

def test_parameters_cell_matches_sftjob():
    "The notebook's parameters are exactly SFTJob's fields, with the same defaults (and a comment each)."
    from llmwb.sft import SFTJob
    tree = ast.parse(_params_cell())
    got = {n.target.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.AnnAssign)}
    want = {f.name: f.default for f in dataclasses.fields(SFTJob)}
    assert got == want
    assert all('#' in l for l in _params_cell().splitlines() if l.strip())

@pytest.mark.heavy
def test_default_run(runs_dir, tmp_path):
    "papermill runs train_sft.ipynb on its defaults: >= 0.95 held-out accuracy (its time is reported, not asserted)."
    out = tmp_path/'train_sft.ipynb'
    t0 = time.time()
    pm.execute_notebook(str(NB), str(out), cwd=str(NBS), progress_bar=False)
    wall = time.time() - t0
    (run,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    m = json.loads((run/'metrics.json').read_text())
    print(f"accuracy {m['accuracy_before']:.3f} -> {m['accuracy_after']:.3f}, {m['steps']} steps, "
          f"train {m['train_runtime_s']}s, job {m['wall_time_s']}s, notebook {wall:.0f}s")
    assert m['status'] == 'completed'
    assert m['accuracy_after'] >= 0.95, m
    assert 'accuracy_before' in m and m['accuracy_before'] < 0.9
    for f in ('config.json', 'config.txt', 'metrics.json', 'metrics.jsonl', 'plots/loss.png', 'model/config.json'):
        assert (run/f).exists(), f
    assert any((run/'tensorboard').iterdir())
    cfg = json.loads((run/'config.json').read_text())
    assert cfg['model'] == 'tiny-gpt2' and cfg['job'] == 'SFTJob'
    assert 'held-out generative accuracy' in out.read_text()

def test_cli_run_keeps_executed_notebook_in_run_folder(runs_dir):
    "`llmwb run train_sft` leaves the executed notebook inside the run folder."
    r = run_cli('run', 'train_sft', '--no-progress', '-p', 'max_train_examples', '64', '-p', 'max_eval_examples', '16',
                '-p', 'max_steps', '3', '-p', 'save_model', 'False', '-p', 'name', 'cli-smoke')
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    assert run.name.endswith('_cli-smoke')
    assert (run/'train_sft.ipynb').exists() and (run/'metrics.json').exists()
    assert json.loads((run/'metrics.json').read_text())['steps'] == 3
    assert not [p for p in runs_dir.iterdir() if p.name.startswith('.')], "temporary notebook left behind"

def test_script_uses_the_same_job(runs_dir):
    "Scripts import the job and its function."
    code = ("from llmwb.sft import SFTJob, train_sft\n"
            "r = train_sft(SFTJob(max_train_examples=32, max_eval_examples=8, max_steps=2, save_model=False), quiet=True)\n"
            "print(r.metrics['steps'], r.run_dir)\n")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines() == [r.stdout.strip().splitlines()[-1]], "quiet=True must print nothing else"
    assert r.stdout.split()[0] == '2'

def test_cli_direct_job(runs_dir):
    r = run_cli('sft', '--max_train_examples', '32', '--max_eval_examples', '8', '--max_steps', '2', '--save_model', 'False')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'run folder:' in r.stdout

# Each bad input gets one clear message, and no run folder is left behind.
BAD = {
    'unknown device': ({'device': 'tpu'}, "Unknown device 'tpu'"),
    'missing dataset path': ({'dataset': './no/such/reviews.jsonl'}, "does not exist"),
    'model not found offline': ({'model': 'acme/not-a-cached-model'}, "not in the local Hugging Face cache"),
}

def _no_runs(runs_dir):
    left = [p.name for p in runs_dir.iterdir()]
    assert not left, f"left behind: {left}"

@pytest.mark.parametrize('case', list(BAD))
def test_bad_input_papermill(case, runs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    params, msg = BAD[case]
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(NB), str(tmp_path/'out.ipynb'), parameters=params, cwd=str(NBS), progress_bar=False,
                            kernel_name='python3')
    assert msg in e.value.evalue, e.value.evalue
    _no_runs(runs_dir)

def test_empty_dataset(runs_dir, tmp_path):
    data = tmp_path/'reviews'; data.mkdir()
    (data/'train.jsonl').write_text(''); (data/'test.jsonl').write_text('{"text": "fine", "label": 1}\n')
    r = run_cli('run', 'train_sft', '--no-progress', '-p', 'dataset', str(data))
    assert r.returncode == 2 and 'empty' in r.stderr.lower(), r.stderr[-2000:]
    _no_runs(runs_dir)

def test_misspelled_parameter_is_refused(runs_dir, tmp_path):
    "A misspelled -p stops the run, under plain papermill and under llmwb run (which refuses before starting)."
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(NB), str(tmp_path/'out.ipynb'), parameters={'modle': 'gpt2'}, cwd=str(NBS),
                            progress_bar=False)
    assert "'modle' (did you mean 'model'?)" in e.value.evalue
    r = run_cli('run', 'train_sft', '-p', 'lerning_rate', '0.1')
    assert r.returncode == 2 and "Unknown parameter" in r.stderr, r.stderr
    _no_runs(runs_dir)

def test_cli_errors_offline(runs_dir):
    r = run_cli('run', 'train_sft', '--no-progress', '-p', 'model', 'gpt2', env={'HF_HUB_OFFLINE': '1'})
    assert r.returncode == 2 and 'tiny-gpt2' in r.stderr and 'local' in r.stderr, r.stderr[-2000:]
    _no_runs(runs_dir)
