"""The original systems' users: every example command line in their documents (../shared/seeds/), with `llmwb` in
front, is accepted by `--dry_run`; one command per system also runs for real for a few steps on offline data.

The commands are kept in tests/seed_commands.txt (`python tests/test_seed_commands.py` rewrites it from the seeds),
translated mechanically as issue 24 lists: `python train.py` -> `llmwb train` (the HF pipeline; `torchrun ...
main.py` too), `python train.py` in the ELIS document -> `llmwb elis`, `python -m src.train.phase1_compressor` ->
`llmwb compressor`, `uv run python cs336_basics/train_model.py` -> `llmwb lm`,
`python scripts/sequence_packing_cache.py` -> `llmwb cache`.
"""
import os, re, sys, json, shlex, shutil
from pathlib import Path
import numpy as np
import pytest
from conftest import ROOT, run_cli

SEEDS = ROOT.parent/'shared'/'seeds'
LIST = Path(__file__).with_name('seed_commands.txt')
PREFIXES = [   # (document, the original command's start, what replaces it)
    ('hf-training-pipeline.md', r'python train\.py', 'llmwb train'),
    ('hf-training-pipeline.md', r'torchrun (?:--\S+ )*main\.py', 'llmwb train'),
    ('hf-training-pipeline.md', r'python -m torch\.distributed\.launch (?:--\S+ )*main\.py', 'llmwb train'),
    ('elis-predictor-trainer.md', r'(?:CUDA_VISIBLE_DEVICES=\S+ )?python train\.py', 'llmwb elis'),
    ('hidden-state-compressor.md', r'python -m src\.train\.phase1_compressor', 'llmwb compressor'),
    ('transformer-lm-training-loop.md', r'uv run python cs336_basics/train_model\.py', 'llmwb lm'),
    ('lz4-cache-training-framework.md', r'python scripts/sequence_packing_cache\.py', 'llmwb cache'),
]

def extract(seeds:Path) -> list[tuple[str, str]]:
    "Every example command of the seed documents as (document:line, the llmwb command); continuation lines joined, comments dropped."
    out = []
    for doc, pat, repl in PREFIXES:
        lines = (seeds/doc).read_text().splitlines()
        i = 0
        while i < len(lines):
            l, n = lines[i].strip(), i + 1
            while l.endswith('\\') and i + 1 < len(lines): i += 1; l = l[:-1].rstrip() + ' ' + lines[i].strip()
            i += 1
            if m := re.match(pat + r'(?=\s|$)', l): out.append((f'{doc}:{n}', re.sub(r'\s+#.*$', '', repl + l[m.end():]).strip()))
    return out

def commands() -> list[tuple[str, str]]:
    return [tuple(l.split(' | ', 1)) for l in LIST.read_text().splitlines() if l.strip()]

def test_command_list_is_current():
    "seed_commands.txt holds exactly the commands of the seed documents (when they are next to the checkout)."
    if not SEEDS.exists(): pytest.skip(f'{SEEDS} is not here; the committed list is used')
    assert extract(SEEDS) == commands(), "run: python tests/test_seed_commands.py"
    assert len(commands()) > 100

# Refusals that are right, and why. Everything else must pass, or be refused only because the hub is out of reach.
EXPECTED = {
    # a checkpoint folder of the pipeline's own earlier run (a placeholder in its document)
    'hf-training-pipeline.md:717': 'does not exist',
}
OFFLINE = ('ModelNotFoundError', 'DatasetNotFoundError')   # a hub model or dataset that cannot be reached from here
# LLM-TRM's D′ of 384 and 512 are for its SmolLM3-3B, which model='auto' uses where it loads: here it cannot, and the
# packaged all-MiniLM-L6-v2 it falls back to (D=384) is too narrow, so those commands are refused as needing that hub model.
# Where a command runs, under the fixture's root (else in work/): ELIS's resume continues the run its precondition made in
# ./checkpoints, apart from ELIS's other commands, whose `--checkpoint-dir ./checkpoints` starts a new run (refused over an
# existing one, as the LM run's checkpoints/ in work/ is); their `--data-dir ../data` is the root's data/.
def cwd_of(where:str) -> str|None:
    return 'elis-resume' if where == 'elis-predictor-trainer.md:198' else 'elis' if where.startswith('elis-') else None

@pytest.fixture(scope='module')
def workdir(tmp_path_factory, mirror):
    "A folder to run the commands in, holding the small real files they name (token files, ELIS traces), and the offline mirror."
    root = tmp_path_factory.mktemp('seedcmds')
    work = root/'work'; (work/'data').mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, vocab in (('train_tokens', 10_000), ('val_tokens', 10_000), ('large_train_tokens', 50_000), ('large_val_tokens', 50_000)):
        np.save(work/'data'/f'{name}.npy', rng.integers(0, vocab, 50_000).astype(np.int64))
    from llmwb.elis import make_sample_traces, write_traces, TRACE_FILE
    write_traces(list(make_sample_traces(300)), root/'data'/'sample'/TRACE_FILE)   # ELIS's `--data-dir ../data`
    # what the documents' resume and repair commands continue: an SFT run and an LM run with checkpoints, a cache
    env = {'LLMWB_DATA_DIR': str(mirror), 'HF_HUB_OFFLINE': '1', 'LLMWB_RUNS_DIR': str(root/'runs'), 'LLMWB_CACHE_DIR': str(root/'caches')}
    for cmd in ('sft --max_steps 2 --save_steps 1 --max_eval_examples 8',
                'lm --train_data data/train_tokens.npy --checkpoint_path checkpoints/model.pt --max_iters 2 --save_steps 1',
                'cache'):
        r = run_cli(*cmd.split(), cwd=work, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
    (root/'elis').mkdir(); (root/'elis-resume').mkdir()   # an ELIS run on its defaults (one epoch) in ./checkpoints, as the original's first run left it
    r = run_cli('elis', '--checkpoint-dir', './checkpoints', '--epochs', '1', '--no-simulate', cwd=root/'elis-resume', env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return work

def _tree(*roots) -> set:
    return {(str(p), p.stat().st_size) for r in roots if Path(r).exists() for p in Path(r).rglob('*')}

@pytest.mark.parametrize('where,cmd', commands(), ids=[w for w, _ in commands()])
def test_dry_run(where, cmd, workdir, mirror, monkeypatch, capsys):
    "`llmwb ... --dry_run` exits 0 and writes nothing, or is refused only because a hub name cannot be reached offline."
    from llmwb.runs import main
    monkeypatch.chdir(workdir.parent/cwd_of(where) if cwd_of(where) else workdir); monkeypatch.setenv('LLMWB_DATA_DIR', str(mirror)); monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('LLMWB_RUNS_DIR', str(workdir.parent/'runs')); monkeypatch.setenv('LLMWB_CACHE_DIR', str(workdir.parent/'caches'))
    before = _tree(workdir.parent)
    rc = main(shlex.split(cmd)[1:] + ['--dry_run'])
    out, err = capsys.readouterr()
    assert _tree(workdir.parent) == before, 'a dry run wrote files'
    if where in EXPECTED:
        assert rc == 2 and EXPECTED[where] in err, (rc, err)
    elif rc != 0:
        assert rc == 2 and any(e in err for e in OFFLINE), f"{cmd}\n{err}"
    else:
        assert 'run folder:' in out and 'nothing was written' in out, out

SMOKE = {   # one command per system, from its document, with an offline model and a few steps
    'hf': 'llmwb train --model tiny-gpt2 --dataset stanfordnlp/imdb --task auto --mode sft --max_steps 2 --batch_size 4 --max_train_examples 32 --max_eval_examples 8',
    'elis': 'llmwb elis --data-dir ../data --batch-size 16 --learning-rate 1e-4 --epochs 1 --hidden-dim 64 --num-layers 2 --checkpoint-dir ./checkpoints',
    'compressor': 'llmwb compressor --stage 1a --d_compressed 32 --num_epochs 1 --num_samples 64 --no_torch_compile --no_wandb',
    'lm': 'llmwb lm --train_data data/train_tokens.npy --vocab_size 10000 --context_length 32 --d_model 32 --num_layers 1 --num_heads 2 --batch_size 4 --max_iters 3 --device cpu',
    'cache': 'llmwb cache --force-rebuild',
}

@pytest.mark.parametrize('system', list(SMOKE))
def test_smoke_run(system, workdir, mirror, runs_dir, cache_dir, tmp_path):
    "The command runs for real, ends with exit 0 and leaves a completed run folder with its training.log."
    work = tmp_path/'work'   # a folder of its own, so that no dry run sees what the real run leaves
    shutil.copytree(workdir/'data', work/'data'); shutil.copytree(workdir.parent/'data', tmp_path/'data')
    r = run_cli(*shlex.split(SMOKE[system])[1:], cwd=work, env={'LLMWB_DATA_DIR': str(mirror), 'HF_HUB_OFFLINE': '1'}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # ELIS's --checkpoint-dir ./checkpoints is its run folder, as it was the original's output folder
    runs = [p for p in [*runs_dir.iterdir(), work/'checkpoints'] if (p/'config.json').exists()]
    assert len(runs) == 1, runs
    assert json.loads((runs[0]/'metrics.json').read_text())['status'] == 'completed'
    assert (runs[0]/'training.log').read_text().strip()

if __name__ == '__main__':
    LIST.write_text(''.join(f'{w} | {c}\n' for w, c in extract(SEEDS)))
    print(f'{LIST}: {len(extract(SEEDS))} commands')
