"""The compressor job end to end: its parameters cell, a papermill sweep, stage 1b starting from stage 1a's weights,
a resumed sweep that skips what is done (by run folder and by 'latest'), its checkpoints as core lists them, two processes through torchrun, the CLI with wandb offline, and refused input
(D′ >= D, stage 1b without a stage-1a checkpoint, a checkpoint whose D is not the model's)."""
import os, sys, json, hashlib, subprocess
from pathlib import Path
import pytest
import papermill as pm
from conftest import NBS, run_cli, check_parameters_cell

NB = NBS/'train_compressor.ipynb'
SMALL = {'num_samples': 60, 'dims': [16, 32], 'num_train_epochs': 2, 'learning_rate': 1e-2, 'torch_compile': False}

def test_parameters_cell_matches_compressorjob():
    "The notebook's parameters are exactly CompressorJob's fields, with the same defaults (and a comment each)."
    from llmwb.compressor import CompressorJob
    check_parameters_cell(NB, CompressorJob)

def test_sweep_stage1b_from_1a_and_resume(runs_dir, cache_dir, tmp_path):
    "papermill runs a two-size sweep; stage 1b starts from stage 1a's best weights; a resumed sweep trains only the new size."
    from llmwb.compressor import (CompressorJob, train_compressor, load_compressor, load_hidden_model, load_texts, cached_hidden_states,
                                  split_states, reconstruction_metrics)
    from llmwb.core import list_checkpoints
    out = tmp_path/'a.ipynb'
    pm.execute_notebook(str(NB), str(out), parameters={**SMALL, 'name': 'sweep'}, cwd=str(NBS), progress_bar=False)
    (run,) = list(runs_dir.iterdir())
    for d in (16, 32):
        assert sorted(p.name for p in (run/f'd{d}').iterdir()) == ['results.json', 'stage1a_best.pt', 'stage1b_best.pt']
    rows = json.loads((run/'sweep.json').read_text())
    assert [(r['d_compressed'], r['stage']) for r in rows] == [(16, '1a'), (16, '1b'), (32, '1a'), (32, '1b')]
    assert all(0 < r['r2'] <= r['opt_r2'] + 1e-6 and r['pct_of_optimum'] == pytest.approx(100 * r['r2'] / r['opt_r2']) for r in rows)
    for f in ('plots/sweep.png', 'metrics.json', 'metrics.jsonl', 'config.json'): assert (run/f).exists(), f
    assert list((run/'tensorboard').iterdir())
    assert 'Every compressor reaches at least' in out.read_text()
    # stage 1b's epoch 0 is stage 1a's best checkpoint, scored on the CoT validation states
    res = json.loads((run/'d16'/'results.json').read_text())
    assert res['1b']['init_from'] == str(run/'d16'/'stage1a_best.pt')
    assert res['1b']['history'][-1]['val_pct_of_optimum'] == pytest.approx(100 * res['1b']['history'][-1]['val_r2'] / res['1b']['optimum_validation']['r2'])
    c1a, _ = load_compressor(run/'d16'/'stage1a_best.pt', d_model=384)
    hf, tok, _ = load_hidden_model()
    hs, fresh = cached_hidden_states(hf, tok, load_texts('sample-cot', 60, seed=42), progress=False)
    assert not fresh                                                   # the job cached them
    m = reconstruction_metrics(c1a, split_states(hs, 42)['validation'])
    assert res['1b']['history'][0]['val_mse'] == pytest.approx(m['mse'], rel=1e-9)
    assert res['1b']['history'][0]['val_mse'] != res['1a']['history'][0]['val_mse']
    # core lists the sweep's checkpoints, each usable
    cks = list_checkpoints(run)
    assert sorted(c['name'] for c in cks) == [f'd{d}/stage{s}_best.pt' for d in (16, 32) for s in ('1a', '1b')]
    assert all(c['ok'] and c['resumable'] and c['kind'] == 'sweep' for c in cks)
    # resume with a third size: the two done are skipped (their files untouched), the new one is trained
    stamp = {p: p.stat().st_mtime_ns for p in run.glob('d*/*')}
    r = train_compressor(CompressorJob(**{**SMALL, 'dims': [16, 32, 48], 'resume_from_checkpoint': str(run)}), quiet=True)
    assert r.run_dir == run and set(r.model) == {'d48/stage1a', 'd48/stage1b'}
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert [(x['d_compressed'], x['stage']) for x in r['rows']][-2:] == [(48, '1a'), (48, '1b')]
    assert (run/'resumes.jsonl').exists() and not any(r['extracted_now'].values())
    # 'latest' finds the same run (the newest matching compressor run) and trains only what it lacks
    r = train_compressor(CompressorJob(**{**SMALL, 'dims': [16, 32, 48, 8], 'stages': ['1a'], 'resume_from_checkpoint': 'latest'}), quiet=True)
    assert r.run_dir == run and set(r.model) == {'d8/stage1a'}
    assert len((run/'resumes.jsonl').read_text().splitlines()) == 2
    # a stage trained but not scored (a run stopped between the phases) is scored from its checkpoint when the run is resumed
    f = run/'d16'/'results.json'; res = json.loads(f.read_text()); want = res['1a']['test']; res['1a']['test'] = None
    f.write_text(json.dumps(res))
    r = train_compressor(CompressorJob(**{**SMALL, 'resume_from_checkpoint': str(run)}), quiet=True)
    assert r.model == {} and json.loads(f.read_text())['1a']['test'] == pytest.approx(want)
    with pytest.raises(Exception, match=r"different num_samples \(60, now 80\)"):
        train_compressor(CompressorJob(**{**SMALL, 'num_samples': 80, 'resume_from_checkpoint': str(run)}), quiet=True)

def test_refused_input(runs_dir, cache_dir, tmp_path):
    "D′ >= D, stage 1b with no stage-1a checkpoint, and a checkpoint for another hidden size: one clear message each, nothing written."
    from llmwb.compressor import CompressorJob, train_compressor, DimensionCompressor, save_compressor
    with pytest.raises(Exception, match=r"D′=384 must be between 1 and D-1 \(dims=\[64, 384\]\).*D=384"):
        train_compressor(CompressorJob(**{**SMALL, 'dims': [64, 384]}), quiet=True)
    with pytest.raises(Exception, match=r"(?s)Stage 1b starts from stage 1a's best checkpoint for D′=16, and there is none.*init_from="):
        train_compressor(CompressorJob(**{**SMALL, 'stages': ['1b']}), quiet=True)
    other = tmp_path/'other'
    save_compressor(other/'d16'/'stage1a_best.pt', DimensionCompressor(64, 16), model='tiny-gpt2')
    save_compressor(other/'d32'/'stage1a_best.pt', DimensionCompressor(64, 32), model='tiny-gpt2')
    with pytest.raises(Exception, match=r"compresses 64-d hidden states \(model 'tiny-gpt2'\), but model 'all-MiniLM-L6-v2' gives 384-d ones"):
        train_compressor(CompressorJob(**{**SMALL, 'stages': ['1b'], 'init_from': str(other)}), quiet=True)
    assert not list(runs_dir.iterdir()) and not cache_dir.exists()

DDP_SCRIPT = r'''
import sys, json, hashlib, torch, os
from llmwb.compressor import CompressorJob, train_compressor
r = train_compressor(CompressorJob(num_samples=40, dims=[16], stages=['1a'], num_train_epochs=2, torch_compile=False, device='cpu',
                                   output_dir=sys.argv[1]), quiet=True)
w = r.model['d16/stage1a'].encoder.weight.detach().numpy().tobytes()
json.dump({'weights': hashlib.sha256(w).hexdigest(), 'world_size': r['world_size']}, open(f"{sys.argv[2]}/rank{os.environ['RANK']}.json", 'w'))
'''

def test_two_processes(runs_dir, cache_dir, tmp_path):
    "torchrun with 2 CPU processes: one run folder, identical weights on both ranks, the checkpoint written once."
    script = tmp_path/'ddp.py'; script.write_text(DDP_SCRIPT)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script), str(runs_dir/'ddp'),
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path/f'rank{i}.json').read_text()) for i in (0, 1))
    assert r0 == r1 and r0['world_size'] == 2
    assert [p.name for p in runs_dir.iterdir()] == ['ddp']
    m = json.loads((runs_dir/'ddp'/'metrics.json').read_text())
    assert m['world_size'] == 2 and m['rows'][0]['d_compressed'] == 16
    from llmwb.compressor import load_compressor
    c, _ = load_compressor(runs_dir/'ddp'/'d16'/'stage1a_best.pt', d_model=384)
    assert hashlib.sha256(c.encoder.weight.detach().numpy().tobytes()).hexdigest() == r0['weights']

def test_cli_with_wandb_offline(runs_dir, cache_dir):
    "llmwb compressor runs the job from the command line; wandb's offline mode logs with no network."
    pytest.importorskip('wandb')
    r = run_cli('compressor', '--num_samples', '30', '--dims', '16', '--stages', '1a', '--num_train_epochs', '1', '--wandb', 'offline',
                env={'WANDB_SILENT': 'true'})
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = list(runs_dir.iterdir())
    assert (run/'d16'/'stage1a_best.pt').exists()
    (wb,) = list((run/'wandb').glob('offline-run-*'))
    assert list(wb.glob('*.wandb'))
