"""The compressor job end to end: its parameters cell, a papermill sweep, stage 1b starting from stage 1a's weights,
a resumed sweep that skips what is done (by run folder and by 'latest'), its checkpoints as core lists them, two processes
through torchrun, refused input (D′ >= D, an init_from without a stage-1a checkpoint, a checkpoint whose D is not the
model's), and LLM-TRM's users (issue 24): its flags, one stage and one D′ at a time, one offline wandb run per D′ with its
project and name, the `cosine_similarity` metric, and the dry run."""
import os, sys, json, hashlib, subprocess, shlex
from pathlib import Path
import pytest
import papermill as pm
from conftest import NBS, run_cli, check_parameters_cell

NB = NBS/'train_compressor.ipynb'
SMALL = {'num_samples': 60, 'sweep_d_values': [16, 32], 'num_train_epochs': 2, 'learning_rate': 1e-2, 'torch_compile': False}

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
    # LLM-TRM's metric names: cosine_similarity (and the optimum's), in sweep.json, results.json and every epoch of metrics.jsonl
    assert all(0 < r['cosine_similarity'] <= 1 and 0 < r['opt_cosine_similarity'] <= 1 and 'cosine' not in r for r in rows)
    epochs = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines() if '"epoch"' in l]
    assert epochs and all('val_cosine_similarity' in e and 'val_cosine' not in e for e in epochs)
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
    r = train_compressor(CompressorJob(**{**SMALL, 'sweep_d_values': [16, 32, 48], 'resume_from_checkpoint': str(run)}), quiet=True)
    assert r.run_dir == run and set(r.model) == {'d48/stage1a', 'd48/stage1b'}
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert [(x['d_compressed'], x['stage']) for x in r['rows']][-2:] == [(48, '1a'), (48, '1b')]
    assert (run/'resumes.jsonl').exists() and not any(r['extracted_now'].values())
    # 'latest' finds the same run (the newest matching compressor run) and trains only what it lacks
    r = train_compressor(CompressorJob(**{**SMALL, 'sweep_d_values': [16, 32, 48, 8], 'stages': ['1a'], 'resume_from_checkpoint': 'latest'}), quiet=True)
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
    "D′ >= D, an init_from with no stage-1a checkpoint, and a checkpoint for another hidden size: one clear message each, nothing written."
    from llmwb.compressor import CompressorJob, train_compressor, DimensionCompressor, save_compressor
    from llmwb.core import ModelNotFoundError
    with pytest.raises(Exception, match=r"D′=384 must be between 1 and D-1 \(sweep_d_values=\[64, 384\]\).*D=384"):
        train_compressor(CompressorJob(**{**SMALL, 'model': 'all-MiniLM-L6-v2', 'sweep_d_values': [64, 384]}), quiet=True)
    # model='auto' here (no SmolLM3-3B offline) is the packaged MiniLM, and a D′ meant for SmolLM3-3B says so
    job = CompressorJob(**{**SMALL, 'sweep_d_values': [64, 384]})
    assert job.model == 'all-MiniLM-L6-v2' and job.model_note.startswith('auto, as HuggingFaceTB/SmolLM3-3B cannot be loaded')
    with pytest.raises(ModelNotFoundError, match=r"D′=384 .*is for LLM-TRM's HuggingFaceTB/SmolLM3-3B, which cannot be loaded here.*D=384"):
        train_compressor(job, quiet=True)
    (tmp_path/'empty').mkdir()
    with pytest.raises(Exception, match=r"(?s)init_from='.*empty' holds no stage-1a checkpoint for D′=16.*orthogonal"):
        train_compressor(CompressorJob(**{**SMALL, 'stages': ['1b'], 'init_from': str(tmp_path/'empty')}), quiet=True)
    other = tmp_path/'other'
    save_compressor(other/'d16'/'stage1a_best.pt', DimensionCompressor(64, 16), model='tiny-gpt2')
    save_compressor(other/'d32'/'stage1a_best.pt', DimensionCompressor(64, 32), model='tiny-gpt2')
    with pytest.raises(Exception, match=r"compresses 64-d hidden states \(model 'tiny-gpt2'\), but model 'all-MiniLM-L6-v2' gives 384-d ones"):
        train_compressor(CompressorJob(**{**SMALL, 'stages': ['1b'], 'init_from': str(other)}), quiet=True)
    assert not list(runs_dir.iterdir()) and not cache_dir.exists()

DDP_SCRIPT = r'''
import sys, json, hashlib, torch, os
from llmwb.compressor import CompressorJob, train_compressor
r = train_compressor(CompressorJob(num_samples=40, d_compressed=16, stages=['1a'], num_train_epochs=2, torch_compile=False, device='cpu',
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

# ---- LLM-TRM's users (issue 24): `python -m src.train.phase1_compressor ...` is `llmwb compressor ...`

def test_every_seed_flag():
    "Every flag of LLM-TRM's tables reaches the field it means (aliases, negations, bare switches, space-separated lists)."
    from llmwb.compressor import CompressorJob
    from llmwb.runs import parse_job_args
    job, dry = parse_job_args(CompressorJob, shlex.split(
        '--stage 1b --d_compressed 256 --batch_size 4 --num_epochs 2 --learning_rate 1e-2 --num_samples 100 --max_seq_length 64 '
        '--output_dir ./checkpoints/phase1 --seed 7 --no_early_stopping --early_stopping_patience 5 --no_torch_compile --no_wandb '
        '--wandb_project proj --wandb_run_name mine --dry_run'), 'llmwb compressor')
    assert dry and (job.stages, job.d_compressed, job.sweeping, job.per_device_train_batch_size, job.num_train_epochs, job.learning_rate,
                    job.num_samples, job.max_seq_length, job.output_dir, job.seed, job.early_stopping, job.early_stopping_patience,
                    job.torch_compile, job.wandb, job.wandb_project, job.wandb_run_name) == \
        (['1b'], 256, False, 4, 2, 1e-2, 100, 64, './checkpoints/phase1', 7, False, 5, False, 'off', 'proj', 'mine')
    job, _ = parse_job_args(CompressorJob, shlex.split('--sweep --sweep_d_values 128 256 384 512 --early_stopping --torch_compile --use_wandb'), 'x')
    assert (job.sweep, job.sweep_d_values, job.d_values(3072), job.early_stopping, job.torch_compile, job.wandb) == \
        (True, [128, 256, 384, 512], [128, 256, 384, 512], True, True, 'on')
    job, _ = parse_job_args(CompressorJob, ['--sweep'], 'x')                               # LLM-TRM's D′ list, and llmwb's 32 (its 12x)
    assert job.d_values(3072) == [32, 64, 128, 256, 512, 1024] and job.stage_list == ['1a', '1b']
    job, _ = parse_job_args(CompressorJob, ['--stage', '1a'], 'x')                         # one D′: LLM-TRM's 256 for SmolLM3-3B (D/12)
    assert (job.d_values(3072), job.d_values(384), job.stage_list, job.early_stopping, job.torch_compile) == ([256], [32], ['1a'], True, True)
    job, _ = parse_job_args(CompressorJob, ['--use_wandb', 'False'], 'x')
    assert job.wandb == 'off'

def _run_main(argv, capsys):
    from llmwb.runs import main
    rc = main(argv); out, err = capsys.readouterr()
    return rc, out, err

@pytest.mark.heavy
def test_one_stage_one_size(runs_dir, cache_dir, capsys):
    "--stage 1a --d_compressed N trains that stage and size only; --stage 1b alone starts orthogonal and says so, and with --resume starts from the run's stage 1a."
    small = ['--d_compressed', '16', '--num_epochs', '1', '--num_samples', '40', '--no_torch_compile', '--no_wandb']
    rc, out, err = _run_main(['compressor', '--stage', '1a', *small], capsys)
    assert rc == 0, err
    (run,) = runs_dir.iterdir()
    assert sorted(str(p.relative_to(run)) for p in run.glob('d*/*')) == ['d16/results.json', 'd16/stage1a_best.pt']
    assert [(r['d_compressed'], r['stage']) for r in json.loads((run/'sweep.json').read_text())] == [(16, '1a')]
    # stage 1b in a new run: nothing to start from but an orthogonal compressor, and the log says so
    rc, out, err = _run_main(['compressor', '--stage', '1b', *small], capsys)
    assert rc == 0, err
    (new,) = [p for p in runs_dir.iterdir() if p != run]
    assert json.loads((new/'d16'/'results.json').read_text())['1b']['init_from'] is None
    assert 'D′=16 (ratio 24) stage 1b from an orthogonal start (no stage 1a of D′=16 in this run' in out
    assert 'from an orthogonal start (no stage 1a' in (new/'training.log').read_text()
    # stage 1b continuing the first run (as LLM-TRM's 1b found 1a's checkpoint in its output_dir): from its stage 1a
    rc, out, err = _run_main(['compressor', '--stage', '1b', *small, '--resume', str(run)], capsys)
    assert rc == 0, err
    res = json.loads((run/'d16'/'results.json').read_text())
    assert list(res) == ['1a', '1b'] and res['1b']['init_from'] == str(run/'d16'/'stage1a_best.pt')
    assert f"stage 1b from {run/'d16'/'stage1a_best.pt'}" in out

def wandb_records(path:Path) -> list:
    "The records of an offline wandb run file: LevelDB's log format (a 7-byte file header, 32 KiB blocks, a 7-byte header per record) of wandb's protobufs."
    import wandb.proto.wandb_internal_pb2 as pb
    data, out, buf, pos = Path(path).read_bytes(), [], b'', 7
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7 or data[pos + 6] == 0: pos += left; continue   # a block's tail, or zero padding
        n, kind = int.from_bytes(data[pos + 4:pos + 6], 'little'), data[pos + 6]
        buf += data[pos + 7:pos + 7 + n]; pos += 7 + n
        if kind in (1, 4): r = pb.Record(); r.ParseFromString(buf); out.append(r); buf = b''   # FULL or LAST: a whole record
    return out

def test_wandb_one_run_per_size(runs_dir, cache_dir):
    "A two-size sweep with --use_wandb and WANDB_MODE=offline makes two offline wandb runs: LLM-TRM's project, <run folder>_d<D′> names, each D′'s epochs and test figures."
    pytest.importorskip('wandb')
    r = run_cli('compressor', '--sweep', '--sweep_d_values', '16', '24', '--stage', '1a', '--num_epochs', '1', '--num_samples', '30',
                '--no_torch_compile', '--use_wandb', env={'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true'})
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = list(runs_dir.iterdir())
    assert (run/'d16'/'stage1a_best.pt').exists() and (run/'d24'/'stage1a_best.pt').exists()
    runs = {}
    for f in sorted((run/'wandb').glob('offline-run-*/*.wandb')):
        recs = wandb_records(f)
        (info,) = [x.run for x in recs if x.WhichOneof('record_type') == 'run']
        config = {i.key: json.loads(i.value_json) for i in info.config.update}
        history = [{i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in x.history.item} for x in recs if x.WhichOneof('record_type') == 'history']
        summary = {i.key or '/'.join(i.nested_key): json.loads(i.value_json) for x in recs if x.WhichOneof('record_type') == 'summary' for i in x.summary.update}
        runs[config['d_compressed']] = (info.project, info.display_name, info.run_group, history, summary)
    assert sorted(runs) == [16, 24]
    for d, (project, name, group, history, summary) in runs.items():
        assert (project, name, group) == ('llm-trm-phase1', f'{run.name}_d{d}', run.name)
        assert [h['_step'] for h in history] == ([1, 2] if d == 16 else [3, 4]) and all('stage1a/val_cosine_similarity' in h for h in history)
        test = json.loads((run/f'd{d}'/'results.json').read_text())['1a']['test']   # the summary holds the held-out figures of results.json
        assert summary['stage1a/test_r2'] == pytest.approx(test['r2']) and summary['stage1a/test_cosine_similarity'] == pytest.approx(test['cosine_similarity'])

def test_dry_run(runs_dir, cache_dir, tmp_path, monkeypatch, capsys):
    "--dry_run resolves the encoder, the D′ values, the texts and stage 1b's start without writing anything; a D′ that does not fit, or a hub model out of reach, is refused."
    work = tmp_path/'work'; work.mkdir(); monkeypatch.chdir(work); monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    rc, out, err = _run_main(['compressor', '--stage', '1b', '--d_compressed', '64', '--use_wandb', '--wandb_run_name', 'mine', '--dry_run'], capsys)
    assert rc == 0, err
    lines = dict(l.split(': ', 1) for l in out.splitlines() if ': ' in l and ' = ' not in l)
    assert lines['model'].endswith('D=384, hidden_states[6]') and lines['D′'] == '64'
    assert lines['stage 1b'].startswith('2000 texts of sample-cot (generated here); starts from D′=64: an orthogonal compressor')
    assert lines['wandb'].endswith("project 'llm-trm-phase1', one run per D′: mine") and 'nothing was written' in out
    assert not list(runs_dir.iterdir()) and not cache_dir.exists() and not list(work.iterdir())
    rc, out, err = _run_main(['compressor', '--model', 'all-MiniLM-L6-v2', '--stage', '1a', '--d_compressed', '512', '--dry_run'], capsys)
    assert rc == 2 and 'D′=512 must be between 1 and D-1 (d_compressed=512)' in err and 'SmolLM3-3B has D=3072' in err
    rc, out, err = _run_main(['compressor', '--stage', '1a', '--d_compressed', '512', '--dry_run'], capsys)   # model=auto: SmolLM3-3B is not here
    assert rc == 2 and "ModelNotFoundError: The compressed size D′=512 (d_compressed=512) is for LLM-TRM's HuggingFaceTB/SmolLM3-3B" in err
    rc, out, err = _run_main(['compressor', '--model', 'HuggingFaceTB/SmolLM3-3B', '--d_compressed', '512', '--dry_run'], capsys)
    assert rc == 2 and 'ModelNotFoundError' in err
