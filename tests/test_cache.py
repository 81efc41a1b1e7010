"""The LZ4 packed-sequence cache: a build killed mid-way and resumed, repair, expansion, refusals, the reader and the job."""
import os, sys, json, time, signal, random, subprocess, dataclasses, ast, pickle, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from conftest import ROOT, NBS

from llmwb.cache import (build_cache, read_manifest, verify, fill_gaps, PackedCache, ShardShuffleSampler, CacheJob,
                         run_build_cache, smart_warmup, decode_shard)
from llmwb.core import ConfigError

SEQ, SHARD = 64, 8   # small shards: the corpus below gives about 400 of them
_WORDS = ("market revenue growth quarter profit loss shares investor bond yield rate inflation policy bank credit "
          "equity debt margin forecast guidance dividend merger acquisition board capital asset risk fund price "
          "demand supply cost tax budget audit filing report annual interim earnings cash flow").split()

@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    "A local JSONL corpus of made-up documents of 5 to 200 words (with some empty ones), about 200k tokens."
    p = tmp_path_factory.mktemp('corpus')/'corpus.jsonl'
    rng = random.Random(0)
    with open(p, 'w') as f:
        for i in range(2000):
            n = 0 if i % 97 == 0 else rng.randint(5, 200)
            f.write(json.dumps({'text': ' '.join(rng.choice(_WORDS) for _ in range(n)) + ('.' if n else '')}) + '\n')
    return p

@pytest.fixture(scope='module')
def tok():
    from llmwb.models import load_tokenizer
    return load_tokenizer('tiny-gpt2')

def _shard_bytes(d): return {p.name: p.read_bytes() for p in sorted(Path(d).glob('shard_*.lz4'))}
def _entries(d): return [{k: e[k] for k in ('file', 'sequences', 'sha256', 'data_sha256', 'start', 'end')} for e in read_manifest(d)['shards']]

def test_killed_build_resumes_to_the_same_cache_and_gaps_are_filled(corpus, tmp_path):
    "SIGKILL a build mid-way: the rerun gives the uninterrupted build's cache; a corrupt and a deleted shard are restored bit for bit."
    killed, ref = tmp_path/'killed', tmp_path/'ref'
    code = (f"from llmwb.cache import build_cache\n"
            f"build_cache({str(killed)!r}, {str(corpus)!r}, 'tiny-gpt2', seq_len={SEQ}, shard_size={SHARD}, progress=False)\n")
    p = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, env={**os.environ, 'PYTHONPATH': str(ROOT)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    n, deadline = 0, time.time() + 90
    try:
        while time.time() < deadline and p.poll() is None:
            if (killed/'manifest.json').exists(): n = len(read_manifest(killed)['shards'])   # never half-written
            if n >= 5: break
            time.sleep(0.002)
        assert p.poll() is None, f"the build ended before it was killed (exit {p.returncode}): {p.stderr.read().decode()[-2000:]}"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        if p.poll() is None: p.kill()
        p.wait()
    man = read_manifest(killed)
    assert not man['complete'] and len(man['shards']) >= 5
    assert verify(killed)['ok']                       # every shard the manifest lists is whole
    done_before = len(man['shards'])

    st = build_cache(killed, str(corpus), 'tiny-gpt2', seq_len=SEQ, shard_size=SHARD, progress=False)
    assert st['complete'] and st['source_exhausted'] and st['shards'] > done_before + 50
    build_cache(ref, str(corpus), 'tiny-gpt2', seq_len=SEQ, shard_size=SHARD, progress=False)
    assert verify(killed, deep=True)['ok']
    assert _entries(killed) == _entries(ref)
    assert _shard_bytes(killed) == _shard_bytes(ref)
    a, b = PackedCache(killed), PackedCache(ref)
    assert len(a) == len(b) == st['sequences']
    assert np.array_equal(a.numpy_batch(range(len(a))), b.numpy_batch(range(len(b))))
    assert not [q for q in killed.iterdir() if q.name.endswith('.tmp')]

    # damage: flip bytes in one shard, delete another
    before = _shard_bytes(killed)
    bad = bytearray(before['shard_00007.lz4']); bad[len(bad) // 2] ^= 0xFF
    (killed/'shard_00007.lz4').write_bytes(bytes(bad))
    (killed/'shard_00250.lz4').unlink()
    rep = verify(killed)
    assert (rep['ok'], rep['corrupt'], rep['missing']) == (False, [7], [250])
    assert fill_gaps(killed, progress=False)['repaired'] == [7, 250]   # the tokenizer is reloaded by its recorded name
    assert _shard_bytes(killed) == before
    assert verify(killed, deep=True)['ok']

def test_expansion_equals_a_direct_build(tok, tmp_path):
    "Build to N (ending inside a shard), grow to 2N: the same files as a direct 2N build."
    grown, direct = tmp_path/'grown', tmp_path/'direct'
    kw = dict(seq_len=128, shard_size=16, progress=False)
    assert build_cache(grown, 'sample-imdb', tok, target_sequences=50, **kw)['shards'] == 4      # 16+16+16+2
    st = build_cache(grown, 'sample-imdb', tok, target_sequences=100, **kw)
    assert (st['sequences'], st['new_shards'], st['new_sequences']) == (100, 4, 50)             # the short shard rebuilt full
    build_cache(direct, 'sample-imdb', tok, target_sequences=100, **kw)
    assert _entries(grown) == _entries(direct) and _shard_bytes(grown) == _shard_bytes(direct)
    assert build_cache(grown, 'sample-imdb', tok, target_sequences=80, **kw)['new_shards'] == 0   # never shrinks

def test_refusals_and_force_rebuild(tok, tmp_path):
    "Another tokenizer or seq_len is refused with both values named; force_rebuild starts over and removes the old shards."
    from llmwb.models import gpt2_tokenizer
    c = tmp_path/'c'
    build_cache(c, 'sample-imdb', tok, seq_len=128, shard_size=16, target_sequences=40, progress=False)
    before = _shard_bytes(c)
    other = gpt2_tokenizer(); other.add_tokens(['<extra>'])
    with pytest.raises(ConfigError, match=r'vocab 50,257.*vocab 50,258') as e: build_cache(c, 'sample-imdb', other, seq_len=128, shard_size=16)
    assert 'force_rebuild=True' in str(e.value) and 'another cache folder' in str(e.value)
    with pytest.raises(ConfigError, match='seq_len=128, and seq_len=64 was asked for'): build_cache(c, 'sample-imdb', tok, seq_len=64, shard_size=16)
    assert _shard_bytes(c) == before                   # refused: nothing touched
    st = build_cache(c, 'sample-imdb', tok, seq_len=64, shard_size=32, target_sequences=10, force_rebuild=True, progress=False)
    assert (st['sequences'], st['shards'], read_manifest(c)['seq_len']) == (10, 1, 64)
    assert list(_shard_bytes(c)) == ['shard_00000.lz4'] and verify(c)['ok']

def test_reader_sampler_and_lru(tok, tmp_path):
    "Random access equals the decoded shards; the sampler visits every index once per epoch, deterministically; the LRU stays bounded."
    c = tmp_path/'c'
    build_cache(c, 'sample-imdb', tok, seq_len=128, shard_size=16, target_sequences=150, progress=False)
    man = read_manifest(c)
    whole = np.concatenate([decode_shard((c/e['file']).read_bytes(), man['dtype'], 128, e['sequences']) for e in man['shards']])
    ds = PackedCache(c, lru_size=3)
    rng = np.random.default_rng(0)
    for i in rng.integers(0, len(ds), 40).tolist(): assert ds[i]['input_ids'].tolist() == whole[i].tolist()
    idx = rng.integers(0, len(ds), 64)
    assert np.array_equal(ds.numpy_batch(idx), whole[idx]) and len(ds._lru) <= 3
    assert torch.equal(torch.stack([x['input_ids'] for x in ds.__getitems__(idx.tolist())]), torch.from_numpy(whole[idx].astype(np.int64)))
    assert len(pickle.dumps(ds)) < 20_000             # workers get the cache without its decoded shards

    fresh = PackedCache(c, lru_size=3)
    seen, sizes = [], []
    for b in torch.utils.data.DataLoader(fresh, batch_size=8, sampler=ShardShuffleSampler(fresh, seed=1)):
        seen += b['input_ids'][:, :4].tolist(); sizes.append(len(fresh._lru))
    assert max(sizes) <= 3 and fresh.decodes == fresh.n_shards == 10                # each shard decoded once in the epoch
    s = ShardShuffleSampler(fresh, seed=1)
    o0 = list(s); assert sorted(o0) == list(range(150)) and o0 == list(ShardShuffleSampler(fresh, seed=1))
    assert seen == whole[o0][:, :4].tolist()
    s.set_epoch(1); o1 = list(s)
    assert sorted(o1) == list(range(150)) and o1 != o0
    r0, r1 = (list(ShardShuffleSampler(fresh, seed=1, rank=r, world_size=2)) for r in (0, 1))
    assert len(r0) == len(r1) == 75 and sorted(r0 + r1) == list(range(150))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); ShardShuffleSampler(fresh, group_size=5)
    assert 'decoded more than once' in str(w[0].message)

def test_smart_warmup_uses_the_estimated_dataset(tok, tmp_path):
    "Warmup is sized on the whole source estimated from the rows consumed, and a warning says when the cache cannot feed it yet."
    c = tmp_path/'c'
    build_cache(c, 'sample-imdb', tok, seq_len=128, shard_size=16, target_sequences=64, progress=False)
    man = read_manifest(c)
    est = round(64 / man['rows_consumed'] * 3000)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        sw = smart_warmup(c, 0.05, batch_size=8, grad_accum=2)
    assert sw['estimated_sequences'] == est and sw['available_steps'] == 4
    assert sw['warmup_steps'] == round(0.05 * -(-est // 16)) and sw['warmup_steps'] > 4
    assert 'longer than the 4 steps' in str(w[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert smart_warmup(c, 3, batch_size=8, grad_accum=2)['warmup_steps'] == 3

def _params_cell(nb):
    cells = json.loads(nb.read_text())['cells']
    return next(''.join(c['source']) for c in cells if 'parameters' in c.get('metadata', {}).get('tags', []))

def test_job_notebook_parameters_match_cachejob():
    "The job notebook's parameters are exactly CacheJob's fields, with the same defaults and a comment each."
    src = _params_cell(NBS/'build_cache.ipynb')
    got = {n.target.id: ast.literal_eval(n.value) for n in ast.parse(src).body if isinstance(n, ast.AnnAssign)}
    assert got == {f.name: f.default for f in dataclasses.fields(CacheJob)}
    assert all('#' in l and '=' not in l.split('#', 1)[1] for l in src.splitlines() if l.strip())

def test_job_notebook_runs_and_records(runs_dir, tmp_path, monkeypatch):
    "papermill runs build_cache.ipynb; its run folder records the build, and a second run grows the same cache."
    import papermill as pm
    monkeypatch.setenv('LLMWB_CACHE_DIR', str(tmp_path/'caches'))
    monkeypatch.setenv('PYTHONPATH', str(ROOT))
    pm.execute_notebook(str(NBS/'build_cache.ipynb'), str(tmp_path/'out.ipynb'), cwd=str(NBS), progress_bar=False,
                        parameters=dict(seq_len=128, target_sequences=300))
    (run,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    m = json.loads((run/'metrics.json').read_text())
    assert (m['status'], m['sequences'], m['shards'], m['verified']) == ('completed', 300, 3, True)
    assert m['compression_ratio'] > 1 and m['bytes_on_disk'] < m['raw_bytes'] and m['seq_per_s'] > 0
    assert Path(m['cache_dir']) == tmp_path/'caches'/'sample-imdb_tiny-gpt2_L128'
    for f in ('config.json', 'config.txt', 'metrics.jsonl', 'plots/build.png'): assert (run/f).exists(), f
    lines = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    assert [l['step'] for l in lines if 'sequences' in l] == [0, 1, 2]          # one line per shard,
    assert lines[-1] == {'step': 2, 'verified': True, 'shards_checked': 3, 'shards_bad': 0}   # then the verification
    assert 'verify: ok' in (tmp_path/'out.ipynb').read_text()
    r = run_build_cache(CacheJob(seq_len=128, target_sequences=400, name='grow'), quiet=True)   # a script, the same cache
    assert (r['sequences'], r['new_shards'], r['cache_dir']) == (400, 2, m['cache_dir'])   # the short shard refilled, one more
    with pytest.raises(ConfigError, match='shard_size=128'): run_build_cache(CacheJob(seq_len=128, shard_size=64), quiet=True)
    assert len([p for p in runs_dir.iterdir() if p.is_dir()]) == 2   # the refused job opened no run folder

# ---- the original framework's users (issue 24): `python scripts/sequence_packing_cache.py [--mode inverse] [--force-rebuild]` ----

def test_original_script_flags_parse():
    "The script's flags are CacheJob's: --mode normal|forward|inverse and --force-rebuild (hyphen or underscore); contradictions are refused."
    from llmwb.runs import parse_job_args
    assert parse_job_args(CacheJob, [], 'llmwb cache')[0] == CacheJob()
    assert parse_job_args(CacheJob, ['--mode', 'inverse'], 'llmwb cache')[0].mode == 'inverse'
    assert parse_job_args(CacheJob, ['--mode', 'forward'], 'llmwb cache')[0].mode == 'normal'
    assert parse_job_args(CacheJob, ['--force-rebuild'], 'llmwb cache')[0].force_rebuild is True
    with pytest.raises(ConfigError, match='force_rebuild=True deletes it'): parse_job_args(CacheJob, ['--mode', 'inverse', '--force-rebuild'], 'x')

def test_inverse_mode_fills_gaps_only_and_force_rebuild_starts_over(runs_dir, cache_dir, capsys):
    "`llmwb cache --mode inverse` rebuilds the missing and corrupt shards of the cache bit for bit and adds nothing; with no cache it is refused; --force-rebuild builds anew."
    from llmwb.runs import main
    flags = ['--seq_len', '64', '--shard_size', '16']
    assert main(['cache', *flags, '--mode', 'inverse']) == 2
    assert 'no cache at' in capsys.readouterr().err and not any(runs_dir.iterdir())
    assert main(['cache', *flags, '--target_sequences', '64']) == 0
    c = cache_dir/'sample-imdb_tiny-gpt2_L64'
    before = _shard_bytes(c)
    (c/'shard_00001.lz4').unlink()
    (c/'shard_00003.lz4').write_bytes(b'not lz4')
    capsys.readouterr()
    assert main(['cache', *flags, '--mode', 'inverse', '--target_sequences', '128']) == 0   # a larger target is not grown to
    assert 'rebuilt 2 missing or corrupt shard(s): [1, 3]' in capsys.readouterr().out
    assert _shard_bytes(c) == before and read_manifest(c)['sequences'] == 64 and verify(c, deep=True)['ok']
    assert main(['cache', *flags, '--mode', 'inverse']) == 0
    assert 'inverse mode: all 4 shards are whole, nothing to fill' in capsys.readouterr().out
    stamp = {p.name: p.stat().st_mtime_ns for p in c.glob('shard_*')}
    time.sleep(0.01)
    assert main(['cache', *flags, '--target_sequences', '64', '--force-rebuild']) == 0
    man = read_manifest(c)
    assert (man['sequences'], _shard_bytes(c)) == (64, before)
    assert all(p.stat().st_mtime_ns > stamp[p.name] for p in c.glob('shard_*'))   # every shard written again

def test_dry_run_says_what_a_run_would_do_and_writes_nothing(runs_dir, cache_dir, capsys):
    "`llmwb cache ... --dry_run` resolves the dataset and tokenizer and says what the run would do to the cache, writing nothing; refusals exit 2."
    from llmwb.runs import main
    assert main(['cache', '--dry_run']) == 0
    out = capsys.readouterr().out
    assert 'dataset: sample-imdb (generated offline)' in out and 'tokenizer: tiny-gpt2 (preset)' in out
    assert f"cache: {cache_dir/'sample-imdb_tiny-gpt2_L256'} (new): would build the whole source into sequences of 256 tokens" in out
    assert not cache_dir.exists() and not any(runs_dir.iterdir())
    assert main(['cache', '--mode', 'inverse', '--dry_run']) == 2
    assert 'no cache at' in capsys.readouterr().err
    assert main(['cache', '--dataset', 'nowhere/corpus.jsonl', '--dry_run']) == 2
    assert 'the path does not exist' in capsys.readouterr().err
    assert not cache_dir.exists() and not any(runs_dir.iterdir())
