"""The GRPO job end to end: its parameters cell, a papermill run, the CLI and refused input, and (slow) that GRPO learns."""
import os, sys, json, time, ast, dataclasses
from pathlib import Path
import pytest
import papermill as pm
from conftest import ROOT, NBS, run_cli

NB = NBS/'train_grpo.ipynb'
SMALL = {'max_train_examples': 64, 'max_eval_examples': 8, 'max_steps': 2, 'batch_size': 8, 'grpo_group_size': 4,
         'max_completion_length': 8, 'logging_steps': 1, 'eval_batch_size': 8}

def _params_cell():
    nb = json.loads(NB.read_text())
    return next(''.join(c['source']) for c in nb['cells'] if 'parameters' in c.get('metadata', {}).get('tags', []))

def test_parameters_cell_matches_grpojob():
    "The notebook's parameters are exactly GRPOJob's fields, with the same defaults (and a comment each)."
    from llmwb.grpo import GRPOJob
    tree = ast.parse(_params_cell())
    got = {n.target.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.AnnAssign)}
    assert got == {f.name: f.default for f in dataclasses.fields(GRPOJob)}
    assert all('#' in l for l in _params_cell().splitlines() if l.strip())

def test_notebook_run_from_a_previous_run(runs_dir, tmp_path):
    "papermill runs train_grpo.ipynb; a second run starts from the first one's folder with grpo_beta > 0 (reference offline)."
    pm.execute_notebook(str(NB), str(tmp_path/'a.ipynb'), parameters={**SMALL, 'name': 'first'}, cwd=str(NBS), progress_bar=False)
    (first,) = [p for p in runs_dir.iterdir() if p.name.endswith('_first')]
    out = tmp_path/'b.ipynb'
    pm.execute_notebook(str(NB), str(out), parameters={**SMALL, 'init_from': str(first), 'grpo_beta': 0.1, 'name': 'second'},
                        cwd=str(NBS), progress_bar=False)
    (second,) = [p for p in runs_dir.iterdir() if p.name.endswith('_second')]
    m = json.loads((second/'metrics.json').read_text())
    assert m['status'] == 'completed' and m['steps'] == 2 and m['init_from'] == str(first)
    recs = [json.loads(l) for l in (second/'metrics.jsonl').read_text().splitlines()]
    assert any('kl' in r for r in recs) and any('rewards/math/mean' in r for r in recs)
    for f in ('plots/rewards.png', 'samples.json', 'model/config.json', 'config.json'): assert (second/f).exists(), f
    assert 'sampled reward: first 20% of steps' in out.read_text()

def test_cli_and_refused_input(runs_dir, tmp_path):
    "llmwb grpo runs the job; bad input gets one clear message (exit 2) and leaves no run folder."
    r = run_cli('grpo', *[x for k, v in SMALL.items() for x in (f'--{k}', str(v))], '--save_model', 'False')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'held-out after:' in r.stdout
    for p in list(runs_dir.iterdir()): __import__('shutil').rmtree(p)
    nomodel = tmp_path/'2026-01-01_00h00_sft'; nomodel.mkdir(); (nomodel/'config.json').write_text('{"job": "SFTJob"}')
    # one subprocess per message costs ~10 s of imports; the other refusals are checked in-process (nbs/08_grpo.ipynb)
    for args, msg in [(['--batch_size', '12'], 'is not a multiple of grpo_group_size 8'),
                      (['--init_from', str(nomodel)], 'holds no saved model')]:
        r = run_cli('grpo', *args)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr[-2000:])
    from llmwb.grpo import GRPOJob, train_grpo
    with pytest.raises(Exception, match='one of math, classification, code, qa'): GRPOJob(rewards='bleu')
    with pytest.raises(Exception, match="does not support mode 'rl'"): train_grpo(GRPOJob(dataset='wikitext'), quiet=True)
    assert not list(runs_dir.iterdir())

@pytest.mark.heavy
def test_code_reward_runs_tests_in_the_sandbox_end_to_end(runs_dir, mirror):
    "SFT teaches tiny-gpt2 the BigCodeBench fixture's function; GRPO with run_tests scores its samples in the sandbox."
    from llmwb.sft import SFTJob, train_sft
    from llmwb.grpo import GRPOJob, train_grpo
    sft = train_sft(SFTJob(dataset='bigcodebench', data_dir=str(mirror), max_steps=40, batch_size=4, lr=1e-3, max_eval_examples=4,
                           logging_steps=10), quiet=True)
    g = train_grpo(GRPOJob(init_from=str(sft.run_dir), dataset='bigcodebench', data_dir=str(mirror), run_tests=True, max_steps=2,
                           batch_size=8, grpo_group_size=4, max_completion_length=24, temperature=0.3, logging_steps=1,
                           max_eval_examples=4, eval_batch_size=4, save_model=False), quiet=True)
    recs = [json.loads(l) for l in (g.run_dir/'metrics.jsonl').read_text().splitlines()]
    passed = [r['code/tests_passed'] for r in recs if 'code/tests_passed' in r]
    assert g.metrics['status'] == 'completed' and passed and max(passed) > 0, recs
    assert g.metrics['reward_after'] == 1.0        # the greedy held-out completions pass their tests in the sandbox
    ends = json.loads((g.run_dir/'samples.json').read_text())['end']
    assert any(c['reward'] == 1.0 and 'def task_func' in c['completion'] for grp in ends for c in grp['completions'])
