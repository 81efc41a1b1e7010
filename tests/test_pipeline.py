"""pretrain -> SFT -> GRPO on the generated arithmetic problems: the pipeline job runs end to end (fast, tiny settings),
and GRPO learns (slow: run with `pytest --slow`)."""
import json, time
from pathlib import Path
import pytest
import papermill as pm
from conftest import NBS, run_cli, check_parameters_cell

def test_parameters_cell_matches_pipelinejob():
    "nbs/pipeline.ipynb's parameters are PipelineJob's fields with their defaults, each commented."
    from llmwb.pipeline import PipelineJob
    check_parameters_cell(NBS/'pipeline.ipynb', PipelineJob)

@pytest.mark.heavy
def test_llmwb_run_pipeline_tiny(runs_dir):
    "`llmwb run pipeline` with tiny settings (the earlier names) runs the three stages and leaves a completed pipeline run linking them."
    r = run_cli('run', 'pipeline', '--no-progress', '-p', 'pretrain_steps', '2', '-p', 'sft_epochs', '0.05', '-p', 'grpo_steps', '2',
                '-p', 'grpo_batch_size', '16', '-p', 'max_eval_examples', '8', '-p', 'name', 'tiny', env={'HF_HUB_OFFLINE': '1'})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    (run,) = [p for p in runs_dir.iterdir() if p.name.split('_', 2)[-1].startswith('pipeline_')]
    assert run.name.endswith('_pipeline_tiny-gpt2_sample-arithmetic_tiny'), run.name
    assert {'pipeline.ipynb', 'pipeline.json', 'metrics.json', 'metrics.jsonl', 'config.json'} <= {p.name for p in run.iterdir()}
    assert (run/'plots'/'stages.png').exists()
    cfg = json.loads((run/'config.json').read_text())
    assert (cfg['job'], cfg['grpo_max_steps'], cfg['sft_num_train_epochs']) == ('PipelineJob', 2, 0.05)
    m = json.loads((run/'metrics.json').read_text())
    assert m['status'] == 'completed', m
    assert m['n_eval'] == 8 and {'score_start', 'score_pretrain', 'score_sft', 'score_grpo'} <= set(m)
    res = json.loads((run/'pipeline.json').read_text())
    assert [r['stage'] for r in res['rows']] == ['start', 'pretrain', 'sft', 'grpo']
    assert res['stages']['start'] == 'tiny-gpt2'
    for stage in ('pretrain', 'sft', 'grpo'):   # each stage ran in its own completed run folder, linked from pipeline.json
        sd = Path(res['stages'][stage])
        assert sd.parent == runs_dir and sd.name.endswith(f'_pipeline-{stage}_tiny'), sd
        assert json.loads((sd/'metrics.json').read_text())['status'] == 'completed'
        assert (sd/'model'/'config.json').exists()
    grpo = json.loads((Path(res['stages']['grpo'])/'config.json').read_text())
    assert grpo['init_from'] == res['stages']['sft'] and grpo['max_steps'] == 2
    lines = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    evals = [(l['step'], l['stage']) for l in lines if 'score' in l]
    steps = [(l['step'], l['stage']) for l in lines if 'seconds' in l]
    assert evals == [(0, 'start'), (1, 'pretrain'), (2, 'sft'), (3, 'grpo')], lines
    assert steps == [(1, 'pretrain'), (2, 'sft'), (3, 'grpo')], lines

@pytest.mark.slow
def test_grpo_learns(runs_dir, tmp_path):
    "From the SFT stage, the last 20% of GRPO steps beat the first 20% by >= 0.15 mean reward, held-out exact match does not drop, GRPO < 6 min."
    t0 = time.time()
    pm.execute_notebook(str(NBS/'pipeline.ipynb'), str(tmp_path/'pipeline.ipynb'), cwd=str(NBS), progress_bar=False)
    (summary,) = [p for p in runs_dir.iterdir() if p.name.split('_', 2)[-1].startswith('pipeline_')]
    res = json.loads((summary/'pipeline.json').read_text())
    rows = {r['stage']: r for r in res['rows']}
    print(json.dumps({'rows': res['rows'], 'gain': res['grpo_reward_gain'], 'seconds': res['seconds'], 'wall': time.time() - t0}, indent=1))
    assert json.loads((summary/'metrics.json').read_text())['status'] == 'completed'
    assert res['grpo_reward_last20'] >= res['grpo_reward_first20'] + 0.15, res
    assert rows['grpo']['score'] >= rows['sft']['score'], rows
    assert res['seconds']['grpo'] < 360, res['seconds']
