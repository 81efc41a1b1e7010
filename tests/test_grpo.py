"""The GRPO job end to end: its parameters cell, a papermill run, the CLI and refused input, exact resume from a checkpoint,
the HF pipeline's RL examples (`llmwb train --mode rl`), mixtures of prompt sources, and the sandboxed code reward."""
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
    for args, msg in [(['--batch_size', '12', '--grpo_group_size', '8'], 'is not a multiple of grpo_group_size 8'),
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

def _reward_model(path:Path) -> Path:
    "A randomly initialised one-output GPT-2 reward model: its scores differ between completions, so every GRPO step has advantages to learn from."
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification
    from llmwb.models import gpt2_tokenizer
    torch.manual_seed(0)
    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, num_labels=1, pad_token_id=50256)).save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return path

def _stop_at(step:int):
    "A trainer callback that ends training right after the checkpoint of `step` is written: a run killed there."
    from transformers import TrainerCallback
    class StopAt(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == step: control.should_training_stop = True
    return StopAt()

RESUME = {   # settings, the step the interrupted run stops at, what the second run continues
    'latest': (dict(save_steps=2), 2, 'latest'),
    # two passes over each generated batch, two micro-batches a step: checkpoint-3 falls between the passes of one batch;
    # the run folder continues from its newest checkpoint
    'between passes': (dict(num_iterations=2, gradient_accumulation_steps=2, per_device_train_batch_size=4, save_steps=1), 3, 'the run folder'),
}

NOT_KEPT = {'step_time'}   # what a logged step may differ in after a resume: its wall-clock seconds

@pytest.mark.heavy
@pytest.mark.parametrize('case', list(RESUME))
def test_resume_is_exact(case, runs_dir, tmp_path):
    """A run stopped at a checkpoint and resumed ends on the very weights of an uninterrupted run of the same config
    (torch.equal, no tolerance: CPU, one thread), logs the same rewards after the checkpoint, and keeps its first samples."""
    import torch
    from llmwb.core import MetricsLog
    from llmwb.grpo import GRPOJob, train_grpo
    settings, stop, cont = RESUME[case]
    kw = dict(max_train_examples=32, max_eval_examples=4, max_steps=4, per_device_train_batch_size=8, max_completion_length=8, logging_steps=1,
              per_device_eval_batch_size=4, save_model=False, reward_model=str(_reward_model(tmp_path/'rm'))) | settings
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = train_grpo(GRPOJob(name='full', **kw), quiet=True)
        want = {k: v.detach().clone() for k, v in full.model.state_dict().items()}
        part = train_grpo(GRPOJob(name='part', **kw), quiet=True, callbacks=[_stop_at(stop)])
        assert part['steps'] == stop
        at_stop = {k: v.detach().clone() for k, v in part.model.state_dict().items()}
        assert any(not torch.equal(at_stop[k], want[k]) for k in want), 'the steps after the checkpoint changed nothing: the test would prove nothing'
        state = torch.load(part.run_dir/'checkpoints'/f'checkpoint-{stop}'/'grpo_state.pt', weights_only=True)
        assert (state['buffer'] is not None) == (case == 'between passes'), state.keys()
        again = train_grpo(GRPOJob(name='part', resume_from_checkpoint=cont if cont == 'latest' else str(part.run_dir), **kw), quiet=True)
    finally: torch.set_num_threads(threads)
    assert again.run_dir == part.run_dir and again['steps'] == 4 and again['resumed_from'].endswith(f'checkpoint-{stop}')
    got = again.model.state_dict()
    diff = {k: (want[k] - got[k]).abs().max().item() for k in want if not torch.equal(want[k], got[k])}
    assert not diff, f'resumed weights differ from the uninterrupted run: {diff}'
    after = lambda rd: [r for r in MetricsLog(rd).read() if r['step'] > stop and 'loss' in r]
    for a, b in zip(after(again.run_dir), after(full.run_dir), strict=True):
        assert {k: v for k, v in a.items() if k not in NOT_KEPT} == {k: v for k, v in b.items() if k not in NOT_KEPT}, (a, b)
    samples = lambda r: json.loads((r.run_dir/'samples.json').read_text())
    assert samples(again) == samples(full)

SEED_RL = {   # the HF pipeline's RL examples with its small batches (hf-training-pipeline.md, "RL" > "Examples"), on the offline
              # preset (gpt2 -> tiny-gpt2, whose 512 positions take 256 + 16 tokens) for one step on the offline fixtures
    'gsm8k --batch_size 4': ('--dataset openai/gsm8k --dataset_config main --mode rl --batch_size 4 --max_prompt_length 256 '
                             '--max_completion_length 16', 4),
    'bigcodebench --batch_size 2': ('--dataset bigcode/bigcodebench --mode rl --max_prompt_length 256 --max_completion_length 16 --batch_size 2', 2),
}

@pytest.mark.parametrize('example', list(SEED_RL))
def test_seed_rl_examples_run(example, runs_dir, mirror, monkeypatch, capsys):
    "`llmwb train --mode rl ... --batch_size 4` (or 2) runs, with the group size its batch implies said in one line."
    import shlex
    from llmwb.runs import main
    monkeypatch.setenv('LLMWB_DATA_DIR', str(mirror)); monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    flags, g = SEED_RL[example]
    rc = main(['train', '--model', 'tiny-gpt2', *shlex.split(flags), '--max_steps', '1', '--max_train_examples', '8', '--max_eval_examples', '2',
               '--logging_steps', '1', '--no_save_model'])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    assert f"note: group size {g}: grpo_group_size was not given and a step's {g} completions do not hold groups of 8" in out, out
    (run,) = runs_dir.iterdir()
    m = json.loads((run/'metrics.json').read_text())
    assert (m['status'], m['steps'], m['group_size'], m['group_from'], m['prompts_per_step']) == ('completed', 1, g, 'batch', 1)
    assert f'_g{g}_bs{g}_len16_acc1_' in run.name

def test_seed_rl_dry_runs(runs_dir, mirror, monkeypatch, capsys, tmp_path):
    "--dry_run states the groups, where the reward model and the policy come from; a contradictory or missing name is refused."
    from llmwb.runs import main
    monkeypatch.setenv('LLMWB_DATA_DIR', str(mirror)); monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    rm = _reward_model(tmp_path/'rm')
    base = ['train', '--mode', 'rl', '--model', 'tiny-gpt2', '--dataset', 'openai/gsm8k', '--dataset_config', 'main']
    assert main(base + ['--batch_size', '4', '--reward_model', str(rm), '--rl_learning_rate', '1e-6', '--rl_warmup_steps', '100', '--dry_run']) == 0
    out = capsys.readouterr().out
    assert "groups: group size 4: grpo_group_size was not given" in out and f"reward model: {rm} (local folder" in out, out
    assert 'learning_rate               = 1e-06' in out and 'warmup_steps                = 100' in out, out
    assert main(base + ['--batch_size', '16', '--eval_steps', '20', '--dry_run']) == 0
    out = capsys.readouterr().out
    assert 'groups: 2 prompts x 8 completions per step' in out and 'evaluation: steps every 20 steps' in out, out
    for args, msg in [(['--batch_size', '4', '--grpo_group_size', '8'], 'is not a multiple of grpo_group_size 8'),
                      (['--reward_model', str(tmp_path/'nope')], 'does not exist'),
                      (['--save_steps', '10', '--load_best_model_at_end'], 'GRPO has no held-out loss')]:
        assert main(base + args + ['--dry_run']) == 2, args
        assert msg in capsys.readouterr().err, args
    assert not list(runs_dir.iterdir())

def test_mixture_of_prompt_sources(runs_dir, mirror, monkeypatch, capsys):
    "`llmwb grpo --datasets sample-arithmetic gsm8k imdb --rates ...`: one run over three sources, each row rewarded by its own task, scored every step."
    from llmwb.runs import main
    monkeypatch.setenv('LLMWB_DATA_DIR', str(mirror)); monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    rc = main(['grpo', '--datasets', 'sample-arithmetic', 'gsm8k', 'imdb', '--rates', '0.4', '0.3', '0.3', '--max_train_examples', '30',
               '--max_eval_examples', '6', '--max_steps', '2', '--batch_size', '12', '--grpo_group_size', '2', '--max_completion_length', '8',
               '--logging_steps', '1', '--save_steps', '2', '--eval_steps', '1', '--no_save_model'])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    (run,) = runs_dir.iterdir()
    assert '_grpo_tiny-gpt2_mix_sample-arithmetic-40_gsm8k-main-30_imdb-sentiment-30_g2_bs12_len8_acc1_steps2' in run.name, run.name
    m = json.loads((run/'metrics.json').read_text())
    assert (m['status'], m['rewards'], m['task']) == ('completed', 'task x1', 'math, classification'), m
    assert sorted(m['per_source_after']) == ['gsm8k/main', 'imdb/plain_text', 'sample-arithmetic'], m['per_source_after']
    recs = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    logged = {k for r in recs for k in r if k.startswith('sources/')}
    assert logged and logged <= {f'sources/{s}/reward' for s in m['per_source_after']}, logged
    assert all(f'  {s}:' in out for s in m['per_source_after']), out     # the held-out lines, one per source
    assert 'held-out at step 1: accuracy' in out and [r['step'] for r in recs if 'heldout/score' in r] == [0, 1, 2]   # eval_steps 1
    assert (run/'checkpoints'/'checkpoint-2'/'grpo_state.pt').exists()
