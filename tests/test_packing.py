"""Packing without cross-contamination (GPT-2 and Llama, sdpa and eager), packed SFT, and pretraining on text and on a
packed-sequence cache that grows between a run and its resumption."""
import json, ast, dataclasses, warnings
from pathlib import Path
import pytest, torch
import papermill as pm
from conftest import NBS

from llmwb.packing import contamination_gap, enable_packed_attention, PackedCollator, pack_dataset

def _tiny(arch, impl):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if arch == 'gpt2':
        return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=256, attn_implementation=impl)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=256, attn_implementation=impl)).eval()

@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
@pytest.mark.parametrize('impl', ['sdpa', 'eager'])
@pytest.mark.parametrize('varlen', [True, False])
def test_packed_logits_equal_logits_alone(arch, impl, varlen):
    "Every example of a packed row has the logits it has alone (atol 1e-4, fp32), by varlen sdpa or the block mask; with neither they differ."
    m = _tiny(arch, impl)
    g = torch.Generator().manual_seed(0)
    exs = [torch.randint(1, 300, (int(n),), generator=g).tolist() for n in torch.randint(5, 60, (6,), generator=g)]
    leak = contamination_gap(m, exs[2], [exs[0] + exs[1], exs[3]])
    enable_packed_attention(m, varlen=varlen)
    assert m.config._attn_implementation == ('llmwb_sdpa_varlen' if varlen and impl == 'sdpa' else impl)
    for i, ex in enumerate(exs):   # each example in turn, after and before the others
        others = exs[:i] + exs[i + 1:]
        gap = contamination_gap(m, ex, [sum(others[:2], []), *others[2:]])
        assert gap < 1e-4, (arch, impl, i, gap)
    assert leak > 1e-3, "without the block mask the packed example should see its neighbours"

def test_packed_batch_trains_like_the_examples_alone():
    "The gradient of a packed batch equals the gradient of the same examples run one by one (Llama, sdpa)."
    m = _tiny('llama', 'sdpa'); enable_packed_attention(m)
    g = torch.Generator().manual_seed(1)
    exs = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (9, 31, 17)]
    b = PackedCollator(0)([{'input_ids': sum(exs, []), 'seq_lengths': [len(e) for e in exs]}, {'input_ids': exs[0], 'seq_lengths': [9]}])
    n_lab = (b['labels'][:, 1:] != -100).sum()
    (m(**b).loss * n_lab).backward()
    packed = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    for e in exs + [exs[0]]:
        (m(input_ids=torch.tensor([e]), labels=torch.tensor([e])).loss * (len(e) - 1)).backward()
    for a, b_ in zip(packed, (p.grad for p in m.parameters())): torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-3)

@pytest.mark.heavy
def test_packed_sft_run(runs_dir):
    "SFT with packing=True: packed rows, the efficiency in metrics.json and TensorBoard, and the model learns the task."
    from llmwb.sft import SFTJob, train_sft
    r = train_sft(SFTJob(packing=True, max_length=512, batch_size=4, max_steps=150, max_eval_examples=200, save_model=False), quiet=True)
    m = json.loads((r.run_dir/'metrics.json').read_text())
    print({k: m[k] for k in ('accuracy_before', 'accuracy_after', 'packing_efficiency', 'packed_rows', 'steps_per_s')})
    assert m['packing'] and m['packing_efficiency'] > 0.95 and m['packed_rows'] < 3000 / 4
    assert m['accuracy_after'] >= 0.6 > m['accuracy_before'], m   # 150 steps of ~30 examples; the unpacked run is at 0.69 there
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(r.run_dir/'tensorboard')); ea.Reload()
    assert ea.Scalars('run/packing_efficiency')[0].value == pytest.approx(m['packing_efficiency'])

def test_packing_refused_for_encoder_decoders(runs_dir):
    from llmwb.sft import SFTJob, train_sft
    from llmwb.core import ConfigError
    with pytest.raises(ConfigError, match='encoder-decoder'): train_sft(SFTJob(model='tiny-t5', packing=True), quiet=True)
    assert not list(runs_dir.iterdir())

def test_pretrain_on_a_growing_cache_resumes_with_more_steps(runs_dir, tmp_path):
    "A run on a cache checkpoints; the cache grows; the resumed run trains over the larger cache with its steps recomputed."
    from llmwb.cache import build_cache
    from llmwb.pretrain import PretrainJob, train_pretrain
    cdir = tmp_path/'cache'
    build_cache(cdir, 'sample-imdb', 'tiny-gpt2', seq_len=64, shard_size=16, target_sequences=48, progress=False)
    job = PretrainJob(cache_dir=str(cdir), batch_size=8, max_eval_examples=8, save_steps=2, warmup=0.1, logging_steps=1, save_model=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        r1 = train_pretrain(job, quiet=True)
    assert any('longer than the' in str(x.message) for x in w), "warmup sized for the whole source exceeds this small cache"
    assert (r1['steps'], r1['steps_planned'], r1['n_train_rows']) == (5, 5, 40)
    build_cache(cdir, 'sample-imdb', 'tiny-gpt2', seq_len=64, shard_size=16, target_sequences=120, progress=False)
    r2 = train_pretrain(job.replace(resume_from_checkpoint=str(r1.run_dir)), quiet=True)
    assert r2.run_dir == r1.run_dir and r2['resumed_from'].endswith('checkpoint-5')
    assert (r2['n_train_rows'], r2['steps_planned'], r2['steps']) == (112, 14, 14)
    assert r2['warmup_steps'] == r1['warmup_steps']          # sized for the estimated full data both times
    assert r2['eval_loss_after'] < r1['eval_loss_before']
    assert len((r1.run_dir/'resumes.jsonl').read_text().splitlines()) == 1

def test_pretrain_refuses_a_cache_of_another_tokenizer(runs_dir, tmp_path):
    from llmwb.cache import build_cache
    from llmwb.pretrain import PretrainJob, train_pretrain
    from llmwb.core import ConfigError
    from llmwb.models import gpt2_tokenizer
    tok = gpt2_tokenizer(); tok.add_tokens(['<extra>'])
    build_cache(tmp_path/'c', 'sample-imdb', tok, seq_len=64, shard_size=16, target_sequences=32, progress=False)
    with pytest.raises(ConfigError, match="not tiny-gpt2's tokenizer"): train_pretrain(PretrainJob(cache_dir=str(tmp_path/'c')), quiet=True)
    assert not list(runs_dir.iterdir())

NB = NBS/'train_pretrain.ipynb'

def test_pretrain_notebook_parameters_match_the_job():
    from llmwb.pretrain import PretrainJob
    src = next(''.join(c['source']) for c in json.loads(NB.read_text())['cells'] if 'parameters' in c.get('metadata', {}).get('tags', []))
    got = {n.target.id: ast.literal_eval(n.value) for n in ast.parse(src).body if isinstance(n, ast.AnnAssign)}
    assert got == {f.name: f.default for f in dataclasses.fields(PretrainJob)}
    assert all('#' in l and '=' not in l.split('#', 1)[1] for l in src.splitlines() if l.strip())

def test_pretrain_notebook_runs_unpacked(runs_dir, tmp_path):
    "papermill runs train_pretrain.ipynb (here unpacked, one padded row per document): perplexity falls, the record is complete."
    pm.execute_notebook(str(NB), str(tmp_path/'out.ipynb'), cwd=str(NBS), progress_bar=False,
                        parameters=dict(packing=False, max_train_examples=300, max_eval_examples=20, max_length=128, batch_size=8, max_steps=30))
    (run,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    m = json.loads((run/'metrics.json').read_text())
    assert m['status'] == 'completed' and not m['packing'] and m['packing_efficiency'] < 0.9
    assert m['eval_perplexity_after'] < m['eval_perplexity_before'] / 10
    for f in ('config.json', 'metrics.jsonl', 'plots/loss.png', 'model/config.json', 'facts.json'): assert (run/f).exists(), f
    assert 'held-out perplexity' in (tmp_path/'out.ipynb').read_text()
