"""pretrain -> SFT -> GRPO on the generated arithmetic problems: GRPO learns (slow: run with `pytest --slow`)."""
import json, time
import pytest
import papermill as pm
from conftest import NBS

@pytest.mark.slow
def test_grpo_learns(runs_dir, tmp_path):
    "From the SFT stage, the last 20% of GRPO steps beat the first 20% by >= 0.15 mean reward, held-out exact match does not drop, GRPO < 6 min."
    t0 = time.time()
    pm.execute_notebook(str(NBS/'pipeline.ipynb'), str(tmp_path/'pipeline.ipynb'), cwd=str(NBS), progress_bar=False)
    (summary,) = [p for p in runs_dir.iterdir() if p.name.split('_', 2)[-1].startswith('pipeline_')]
    res = json.loads((summary/'pipeline.json').read_text())
    rows = {r['stage']: r for r in res['rows']}
    print(json.dumps({'rows': res['rows'], 'gain': res['grpo_reward_gain'], 'seconds': res['seconds'], 'wall': time.time() - t0}, indent=1))
    assert res['grpo_reward_last20'] >= res['grpo_reward_first20'] + 0.15, res
    assert rows['grpo']['score'] >= rows['sft']['score'], rows
    assert res['seconds']['grpo'] < 360, res['seconds']
