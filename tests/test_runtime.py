"""One job runtime (issue 23): one vocabulary, one event stream, one run/checkpoint mechanism, public seams, for every job."""
import ast, json, os, sys, subprocess
from pathlib import Path
import pytest

from llmwb.core import ALIASES, VOCABULARY, Callback, PHASES, list_checkpoints
from llmwb.runs import JOBS

ROOT = Path(__file__).resolve().parents[1]

# the fields each job had before the vocabulary (llmwb 0bb9568), and the pipeline notebook's parameters
OLD_FIELDS = {
    'sft': ['model', 'dataset', 'dataset_config', 'datasets', 'configs', 'rates', 'mixture_strategy', 'data_dir', 'train_split', 'eval_split',
            'max_train_examples', 'max_eval_examples', 'max_length', 'packing', 'num_train_epochs', 'max_steps', 'batch_size', 'grad_accum', 'lr',
            'lr_scheduler', 'warmup', 'weight_decay', 'max_grad_norm', 'seed', 'device', 'dtype', 'attn_implementation', 'use_lora', 'lora_r',
            'lora_alpha', 'lora_dropout', 'lora_target_modules', 'merge_lora', 'load_in_4bit', 'load_in_8bit', 'moe_load_in_4bit', 'moe_load_in_8bit',
            'save_steps', 'save_total_limit', 'resume_from_checkpoint', 'load_best_model_at_end', 'metric_for_best_model', 'multi_gpu',
            'eval_max_new_tokens', 'eval_batch_size', 'logging_steps', 'save_model', 'run_dir', 'name'],
    'pretrain': ['model', 'dataset', 'dataset_config', 'cache_dir', 'data_dir', 'train_split', 'max_train_examples', 'max_eval_examples', 'max_length',
                 'packing', 'num_train_epochs', 'max_steps', 'batch_size', 'grad_accum', 'lr', 'lr_scheduler', 'warmup', 'weight_decay', 'max_grad_norm',
                 'seed', 'device', 'dtype', 'attn_implementation', 'logging_steps', 'eval_steps', 'save_steps', 'save_total_limit',
                 'resume_from_checkpoint', 'multi_gpu', 'save_model', 'run_dir', 'name'],
    'grpo': ['model', 'init_from', 'dataset', 'dataset_config', 'data_dir', 'train_split', 'eval_split', 'max_train_examples', 'max_eval_examples',
             'rewards', 'reward_weights', 'reward_model', 'run_tests', 'code_timeout', 'max_code_chars', 'grpo_beta', 'grpo_group_size',
             'max_prompt_length', 'max_completion_length', 'temperature', 'disable_dropout', 'max_steps', 'batch_size', 'grad_accum', 'num_iterations',
             'epsilon', 'loss_type', 'scale_rewards', 'rl_learning_rate', 'rl_warmup_steps', 'lr_scheduler', 'weight_decay', 'max_grad_norm', 'use_lora',
             'lora_r', 'lora_alpha', 'lora_dropout', 'lora_target_modules', 'merge_lora', 'seed', 'device', 'dtype', 'attn_implementation', 'multi_gpu',
             'eval_batch_size', 'num_samples', 'logging_steps', 'save_model', 'run_dir', 'name'],
    'lm': ['train_data', 'val_data', 'corpus', 'tokenizer', 'val_tokens', 'vocab_size', 'context_length', 'd_model', 'num_layers', 'num_heads', 'd_ff',
           'rope_theta', 'tie_embeddings', 'batch_size', 'grad_accum', 'learning_rate', 'min_learning_rate', 'weight_decay', 'beta1', 'beta2',
           'warmup_iters', 'max_iters', 'gradient_clip_val', 'eval_interval', 'eval_batches', 'log_interval', 'checkpoint_interval', 'checkpoint_path',
           'keep_last', 'resume', 'device', 'dtype', 'compile', 'num_threads', 'seed', 'sample_tokens', 'sample_prompt', 'run_dir', 'name'],
    'cache': ['dataset', 'dataset_config', 'split', 'data_dir', 'tokenizer', 'seq_len', 'shard_size', 'target_sequences', 'compression_level',
              'cache_dir', 'force_rebuild', 'fill_gaps', 'verify', 'run_dir', 'name'],
    'elis': ['data', 'n_requests', 'every', 'skip_bad_lines', 'encoder', 'num_layers', 'hidden', 'max_length', 'freeze_encoder', 'prompt_embedding',
             'learning_rate', 'batch_size', 'num_epochs', 'patience', 'save_every', 'resume', 'embedding_cache', 'encode_batch_size', 'simulate',
             'sim_workers', 'sim_load', 'sim_loads', 'sim_requests', 'seed', 'device', 'run_dir', 'name'],
    'compressor': ['model', 'layer', 'text_dataset', 'text_config', 'cot_dataset', 'cot_config', 'data_dir', 'num_samples', 'max_seq_length', 'dims',
                   'stages', 'init_from', 'learn_mean', 'batch_size', 'num_epochs', 'learning_rate', 'patience', 'no_early_stopping', 'torch_compile',
                   'extract_batch_size', 'hidden_cache', 'wandb', 'wandb_project', 'resume', 'seed', 'device', 'run_dir', 'name'],
    'pipeline': ['model', 'dataset', 'dataset_config', 'pretrain_steps', 'sft_epochs', 'sft_lr', 'grpo_steps', 'grpo_lr', 'grpo_batch_size',
                 'grpo_group_size', 'max_completion_length', 'max_eval_examples', 'seed', 'name'],
}

def job_classes():
    return {name: spec.load()[0] for name, spec in JOBS.items()}

def test_one_name_per_concept():
    "No job declares a field under a name the vocabulary replaced, and every concept a job has uses the canonical name."
    for name, cls in job_classes().items():
        fields = set(cls.field_names())
        old_as_fields = sorted(fields & set(ALIASES))
        assert not old_as_fields, f"{name}: fields {old_as_fields} are aliases of {[ALIASES[o] for o in old_as_fields]}"
        cls()   # every job's config builds with its defaults
    # a concept present in several jobs has the same name in all of them
    seen = {}
    for name, cls in job_classes().items():
        for f in cls.field_names():
            if f in VOCABULARY: seen.setdefault(f, []).append(name)
    for concept in ('learning_rate', 'seed', 'device', 'output_dir'):
        assert len(seen.get(concept, [])) >= 6, (concept, seen.get(concept))

NEGATED = {'compressor': {'no_early_stopping': 'early_stopping'}}   # old names that meant the opposite of today's field

@pytest.mark.parametrize('job', list(OLD_FIELDS))
def test_old_names_still_work(job):
    "Every name a job accepted before is a field or an alias of one: in from_dict, as a keyword, and read back."
    cls = JOBS[job].load()[0]
    fields, aliases = set(cls.field_names()), cls.aliases()
    for old in OLD_FIELDS[job]:
        if old in NEGATED.get(job, {}):
            new = NEGATED[job][old]
            assert all(getattr(cls.from_dict({old: v}), new) is (not v) and getattr(cls(**{old: v}), old) is v for v in (True, False))
            continue
        assert old in fields or old in aliases, f"{job}: {old!r} is neither a field nor an alias"
        if old in aliases:
            new = aliases[old]
            val = getattr(cls(), new)
            job_ = cls.from_dict({old: val})
            assert getattr(job_, new) == val and getattr(job_, old) == val
            with pytest.raises(Exception, match='both'): cls.from_dict({old: val, new: val})

def test_help_lists_aliases():
    out = subprocess.run([sys.executable, '-m', 'llmwb.runs', 'sft', '--help'], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    text = ' '.join(out.stdout.split())
    assert '--learning_rate' in text and '(also --lr, --rl_learning_rate)' in text and '--per_device_train_batch_size' in text

def test_vocabulary_table_in_readme():
    "The README's vocabulary table is the one core generates."
    from llmwb.core import vocabulary_table
    assert vocabulary_table().strip() in (ROOT/'README.md').read_text()

def private_imports(path:Path) -> list[str]:
    "`from X import _name` (and `import x._y`) of another module in a module's source, X not __future__."
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module != '__future__':
            bad += [f"{path.name}:{node.lineno} from {node.module} import {a.name}" for a in node.names
                    if a.name.startswith('_') and not a.name.startswith('__')]
    return bad

def test_no_module_imports_private_names():
    bad = [b for p in sorted((ROOT/'llmwb').glob('*.py')) if p.name != '_modidx.py' for b in private_imports(p)]
    assert not bad, bad

# ---- one event stream, one run and checkpoint mechanism: every job ----

class Recorder(Callback):
    "Every event with the phase it came in."
    def __init__(self): self.events, self.phase = [], None
    def on_phase_start(self, run, phase): self.events.append(('phase_start', phase)); self.phase = phase
    def on_phase_end(self, run, phase, seconds): self.events.append(('phase_end', phase)); self.phase = None
    def on_open(self, run, facts): self.events.append(('open', None))
    def on_step(self, run, step, metrics): self.events.append(('step', self.phase))
    def on_evaluate(self, run, step, metrics): self.events.append(('evaluate', self.phase))
    def on_checkpoint(self, run, step, path): self.events.append(('checkpoint', self.phase)); assert Path(path).exists(), path
    def on_end(self, run, status, metrics): self.events.append(('end', status))
    def skeleton(self): return [e for e in self.events if e[0] not in ('step', 'evaluate', 'checkpoint')]
    def kinds_in(self, phase): return {k for k, p in self.events if p == phase and k in ('step', 'evaluate', 'checkpoint')}

SKELETON = [('phase_start', 'data'), ('phase_end', 'data'), ('open', None)] + \
           [e for p in PHASES[1:] for e in (('phase_start', p), ('phase_end', p))] + [('end', 'completed')]

def small_jobs():
    "(job name, a few-step config that leaves checkpoints, the fields that continue it further) for each job that resumes."
    from llmwb.sft import SFTJob
    from llmwb.pretrain import PretrainJob
    from llmwb.grpo import GRPOJob
    from llmwb.loop import LMJob
    from llmwb.cache import CacheJob
    from llmwb.elis import ELISJob
    from llmwb.compressor import CompressorJob
    return {
        'sft': (SFTJob(max_train_examples=32, max_eval_examples=8, max_steps=2, per_device_train_batch_size=8, logging_steps=1, save_steps=2,
                       save_model=False), dict(max_steps=4)),
        'pretrain': (PretrainJob(max_train_examples=40, max_eval_examples=4, max_steps=2, per_device_train_batch_size=4, max_length=64,
                                 logging_steps=1, save_steps=2, save_model=False), dict(max_steps=4)),
        'grpo': (GRPOJob(max_train_examples=16, max_eval_examples=4, max_steps=1, per_device_train_batch_size=4, grpo_group_size=2,
                         max_completion_length=4, logging_steps=1, per_device_eval_batch_size=4, save_steps=1, save_model=False), dict(max_steps=2)),
        'lm': (LMJob(max_steps=4, logging_steps=2, eval_steps=2, save_steps=2, d_model=32, num_layers=1, num_heads=2, context_length=32,
                     per_device_train_batch_size=4, eval_batches=2, sample_tokens=0), dict(max_steps=6)),
        'cache': (CacheJob(target_sequences=48, seq_len=64, shard_size=16), dict(target_sequences=80)),
        'elis': (ELISJob(n_requests=120, num_train_epochs=1, num_layers=2, hidden=32, simulate=False, save_every=1), dict(num_train_epochs=2)),
        'compressor': (CompressorJob(num_samples=40, dims=[32], stages=['1a'], num_train_epochs=1, torch_compile=False, max_seq_length=32),
                       dict(stages=['1a', '1b'])),
    }

@pytest.mark.heavy
@pytest.mark.parametrize('name', ['sft', 'pretrain', 'grpo', 'lm', 'cache', 'elis', 'compressor'])
def test_job_runtime(name, runs_dir, cache_dir, monkeypatch, capsys):
    """A job run for a few steps reports the same events as every other job, leaves checkpoints that `llmwb checkpoints`
    lists and verifies, and continues (resume_from_checkpoint='latest') through core's resume_point in its own folder."""
    import llmwb.core as core
    from llmwb.runs import main
    job, more = small_jobs()[name]
    fn = JOBS[name].load()[1]
    rec = Recorder()
    first = fn(job, quiet=True, callbacks=[rec])
    assert rec.skeleton() == SKELETON, rec.skeleton()
    assert 'step' in rec.kinds_in('train') and 'evaluate' in rec.kinds_in('evaluate_after'), rec.events
    assert 'checkpoint' in rec.kinds_in('train') | rec.kinds_in('save'), rec.events
    assert json.loads((first.run_dir/'metrics.json').read_text())['status'] == 'completed'
    assert (first.run_dir/'metrics.jsonl').exists() and any((first.run_dir/'tensorboard').iterdir())
    # llmwb checkpoints: every checkpoint of the run, verified in full
    cks = list_checkpoints(first.run_dir)
    assert cks and all(c['ok'] for c in cks), cks
    capsys.readouterr()
    assert main(['checkpoints', str(first.run_dir)]) == 0
    out = capsys.readouterr().out
    assert all(c['name'] in out for c in cks) and 'DAMAGED' not in out, out
    # resume: the newest matching run, continued in its own folder, found by core's resume_point
    calls = []
    orig = core.resume_mismatch
    monkeypatch.setattr(core, 'resume_mismatch', lambda *a: calls.append(a) or orig(*a))
    rec2 = Recorder()
    second = fn(job.replace(resume_from_checkpoint='latest', **more), quiet=True, callbacks=[rec2])
    assert calls, f"{name} did not resume through llmwb.core.resume_point"
    assert second.run_dir == first.run_dir and (first.run_dir/'resumes.jsonl').exists()
    assert rec2.skeleton() == SKELETON, rec2.skeleton()

def test_pipeline_events(runs_dir, cache_dir):
    "The pipeline reports the same events as every job (its stages run as job notebooks in their own folders)."
    from llmwb.pipeline import PipelineJob, run_pipeline
    rec = Recorder()
    res = run_pipeline(PipelineJob(pretrain_max_steps=2, sft_num_train_epochs=0.05, grpo_max_steps=1, grpo_per_device_train_batch_size=8,
                                   max_eval_examples=4, max_completion_length=4), quiet=True, callbacks=[rec])
    assert rec.skeleton() == SKELETON, rec.skeleton()
    assert 'step' in rec.kinds_in('train') and 'evaluate' in rec.kinds_in('evaluate_after')
    assert (res.run_dir/'pipeline.json').exists()
