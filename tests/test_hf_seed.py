"""The HF pipeline's users (issue 24): its train.py flags on the SFT and pretraining jobs, mixtures for pretraining,
LoRA and 4/8-bit loading for pretraining, SFT evaluation at intervals with logging following it, the pipeline's run
folder names, and dry runs that resolve models and datasets without downloading or writing anything."""
import json, os
from pathlib import Path
import pytest

from llmwb.core import ConfigError, ModelNotFoundError, DatasetNotFoundError, MetricsLog
from llmwb.runs import parse_job_args, main
from llmwb.sft import SFTJob
from llmwb.pretrain import PretrainJob, train_pretrain
from llmwb.hftrain import load_job_data

def parse(cls, cmd:str):
    job, dry = parse_job_args(cls, cmd.split(), 'llmwb train')
    return job

# ---- every flag of the pipeline's train.py (modes sft and pretrain) ----

SEED_FLAGS = [   # (the flags as the pipeline's document writes them, the fields they set)
    ('--datasets stanfordnlp/imdb glue glue --dataset_configs None sst2 mrpc --mixture_rates 0.5 0.3 0.2',
     dict(datasets=['stanfordnlp/imdb', 'glue', 'glue'], configs=[None, 'sst2', 'mrpc'], rates=[0.5, 0.3, 0.2])),
    ('--dataset glue --dataset_config sst2', dict(dataset='glue', dataset_config='sst2')),
    ('--model gpt2 --batch_size 16 --max_length 256 --save_steps 1000', dict(model='gpt2', per_device_train_batch_size=16, max_length=256, save_steps=1000)),
    ('--use_packing --use_flash_attention', dict(packing=True, use_flash_attention=True)),
    ('--attn_implementation auto --device cpu', dict(attn_implementation='auto', device='cpu')),
    ('--multi_gpu --gradient_accumulation_steps 4 --ddp_backend nccl', dict(multi_gpu=True, gradient_accumulation_steps=4, ddp_backend='nccl')),
    ('--use_lora --lora_r 32 --lora_alpha 64 --lora_dropout 0.05', dict(use_lora=True, lora_r=32, lora_alpha=64, lora_dropout=0.05)),
    ('--moe_load_in_4bit --batch_size 1', dict(moe_load_in_4bit=True, per_device_train_batch_size=1)),
    ('--moe_load_in_8bit', dict(moe_load_in_8bit=True)),
    ('--save_steps 500 --save_total_limit 3', dict(save_steps=500, save_total_limit=3)),
    ('--resume_from_checkpoint latest --eval_steps 200 --save_steps 400', dict(resume_from_checkpoint='latest', eval_steps=200, save_steps=400)),
    ('--resume_from_checkpoint latest --load_best_model_at_end --metric_for_best_model eval_loss --save_steps 500',
     dict(load_best_model_at_end=True, metric_for_best_model='eval_loss')),
    ('--output_dir ./custom_experiment', dict(output_dir='./custom_experiment')),
    ('--logging_steps 50', dict(logging_steps=50)),
    ('--max_steps 100', dict(max_steps=100)),
]

@pytest.mark.parametrize('cls', [SFTJob, PretrainJob])
@pytest.mark.parametrize('flags,want', SEED_FLAGS)
def test_seed_flags(cls, flags, want):
    job = parse(cls, flags)
    for k, v in want.items(): assert getattr(job, k) == v, (k, getattr(job, k), v)

def test_logging_follows_evaluation():
    "The pipeline's rule: logging every eval_steps unless logging_steps is given; nothing evaluated without eval_steps."
    assert (parse(SFTJob, '--eval_steps 100').logging_interval(), parse(SFTJob, '--eval_steps 100').evaluation()) == (100, 'steps')
    assert parse(SFTJob, '--logging_steps 10 --eval_steps 100').logging_interval() == 10
    assert (parse(SFTJob, '--logging_steps 50').logging_interval(), parse(SFTJob, '--logging_steps 50').evaluation()) == (50, 'no')
    with pytest.raises(ConfigError, match="eval_strategy='steps'"): parse(SFTJob, '--eval_steps 100 --eval_strategy no')

def test_fp16_switch():
    "The pipeline's --fp16 (torchrun ... --multi_gpu --fp16 --batch_size 4) sets the training precision."
    assert parse(SFTJob, '--multi_gpu --fp16 --batch_size 4').dtype == 'fp16'
    assert parse(PretrainJob, '--bf16').dtype == 'bf16' and parse(SFTJob, '--no_fp16').dtype == 'fp32'

def test_run_folder_names():
    "The pipeline's bs/len/acc/multigpu parts: 2025-07-30_14h32m_gpt2_imdb-sentiment_sft_bs8_len256_acc4_multigpu."
    j = parse(SFTJob, '--model gpt2 --dataset stanfordnlp/imdb --batch_size 8 --max_length 256 --gradient_accumulation_steps 4 --multi_gpu')
    assert j.run_name() == 'sft_gpt2_imdb-sentiment_bs8_len256_acc4_multigpu_ep5'
    assert parse(PretrainJob, '--max_length 128').run_name() == 'pretrain_tiny-gpt2_sample-imdb_packed_bs16_len128_acc1_ep1'

# ---- dry runs: names resolved, nothing downloaded or written ----

def dry(capsys, *args):
    rc = main(['train', *args, '--dry_run'])
    out, err = capsys.readouterr()
    return rc, out, err

def test_dry_run_combined_optimizations(runs_dir, mirror, monkeypatch, capsys):
    "'Combine all optimizations' is accepted here: flash falls back off CUDA with the reason; the data come from the mirror."
    monkeypatch.setenv('LLMWB_DATA_DIR', str(mirror))
    rc, out, err = dry(capsys, '--mode', 'pretrain', '--model', 'tiny-gpt2', '--dataset', 'wikitext', '--dataset_config', 'wikitext-103-raw-v1',
                       '--use_lora', '--use_packing', '--use_flash_attention', '--lora_r', '16', '--batch_size', '32', '--max_length', '512')
    assert rc == 0, err
    assert f"wikitext/wikitext-103-raw-v1 (Salesforce/wikitext): local mirror {mirror}" in out
    assert 'falls back' in out and 'use_lora                    = True' in out
    assert list(runs_dir.iterdir()) == []
    # the pipeline's own model is refused offline, as loading it would be
    rc, out, err = dry(capsys, '--mode', 'pretrain', '--model', 'Qwen/Qwen3-1.7B-Base', '--dataset', 'wikitext', '--use_lora', '--use_packing',
                       '--use_flash_attention', '--lora_r', '16', '--batch_size', '32', '--max_length', '4096')
    assert rc == 2 and 'ModelNotFoundError' in err and "'Qwen/Qwen3-1.7B-Base' is not in the local Hugging Face cache" in err
    assert list(runs_dir.iterdir()) == []

def test_dry_run_mixture_and_machine(runs_dir, mirror, monkeypatch, capsys):
    "A mixture lists each source; what this machine lacks (CUDA, two GPUs, fp16 on CPU) is a line, not a refusal."
    monkeypatch.setenv('LLMWB_DATA_DIR', str(mirror))
    rc, out, err = dry(capsys, '--mode', 'sft', '--datasets', 'stanfordnlp/imdb', 'glue', '--dataset_configs', 'None', 'sst2',
                       '--mixture_rates', '0.7', '0.3', '--multi_gpu', '--ddp_backend', 'nccl', '--dtype', 'fp16', '--eval_steps', '100')
    assert rc == 0, err
    lines = dict(l.split(': ', 1) for l in out.splitlines() if ': ' in l and not l.startswith(' '))
    assert lines['dataset stanfordnlp/imdb (rate 0.7)'].startswith('imdb/plain_text (stanfordnlp/imdb): local mirror')
    assert lines['dataset glue/sst2 (rate 0.3)'].startswith('glue/sst2 (nyu-mll/glue): local mirror')
    assert lines['evaluation'] == 'steps every 100 steps' and lines['logging'] == 'every 100 steps'
    if not __import__('torch').cuda.is_available():
        assert 'the run would stop' in lines['processes'] and 'the run would stop' in lines['precision']
    assert list(runs_dir.iterdir()) == []

def test_dry_run_refusals(runs_dir, monkeypatch, capsys):
    "Names that cannot be resolved are refused with loading's errors, before anything is written."
    monkeypatch.delenv('LLMWB_DATA_DIR', raising=False)
    rc, out, err = dry(capsys, '--mode', 'sft', '--dataset', 'stanfordnlp/imdb')
    assert rc == 2 and 'DatasetNotFoundError' in err and 'llmwb fixtures DIR' in err
    rc, out, err = dry(capsys, '--mode', 'sft', '--dataset', 'glue')
    assert rc == 2 and 'needs a config' in err
    rc, out, err = dry(capsys, '--mode', 'pretrain', '--dataset', 'imbd')
    assert rc == 2 and "Did you mean 'imdb'" in err
    rc, out, err = dry(capsys, '--mode', 'pretrain', '--max_length', '4096')
    assert rc == 2 and "longer than tiny-gpt2's 512 positions" in err
    assert list(runs_dir.iterdir()) == []

# ---- pretraining: mixtures, LoRA, quantization ----

def test_pretrain_mixture_from_the_pipeline(runs_dir, mirror):
    "--datasets stanfordnlp/imdb glue --dataset_configs None sst2 --mixture_rates 0.6 0.4 --mode pretrain, on the offline fixtures."
    args = ['--datasets', 'stanfordnlp/imdb', 'glue', '--dataset_configs', 'None', 'sst2', '--mixture_rates', '0.6', '0.4',
            '--max_train_examples', '200', '--max_eval_examples', '20', '--data_dir', str(mirror)]
    job = parse(PretrainJob, ' '.join(args))
    d = load_job_data(job)
    assert d.train.column_names == ['text', 'source'] and len(d.train) == 200
    src = list(d.train['source'])
    assert (src.count('imdb/plain_text'), src.count('glue/sst2')) == (120, 80)
    assert main(['train', '--mode', 'pretrain', *args, '--max_steps', '3', '--batch_size', '4', '--max_length', '64', '--logging_steps', '1']) == 0
    (run,) = runs_dir.iterdir()
    assert run.name.endswith('pretrain_tiny-gpt2_mix_imdb-sentiment-60_glue-sst2-40_packed_bs4_len64_acc1_steps3')
    m = json.loads((run/'metrics.json').read_text())
    assert m['status'] == 'completed' and m['steps'] == 3 and m['eval_loss_after'] < m['eval_loss_before']
    assert 'imdb/plain_text' in (run/'training.log').read_text() and 'glue/sst2' in (run/'training.log').read_text()

def test_pretrain_combined_optimizations_run(runs_dir):
    "LoRA + packing + use_flash_attention train a few steps on this CPU: attention falls back and the run says why."
    r = train_pretrain(parse(PretrainJob, '--use_lora --use_packing --use_flash_attention --lora_r 16 --batch_size 4 --max_length 128 '
                                          '--max_steps 3 --max_train_examples 100 --max_eval_examples 8 --device cpu'), quiet=True)
    assert (r['steps'], r['lora'], r['attn_implementation']) == (3, True, 'sdpa')
    assert r['trainable_params'] < r['total_params'] / 10 and (r.run_dir/'adapter'/'adapter_config.json').exists()
    assert 'use_flash_attention: FlashAttention 2 needs a CUDA device' in (r.run_dir/'training.log').read_text()

def test_pretrain_quantization(runs_dir):
    "4/8-bit weights need adapters (QLoRA), as in SFT; on this CPU a real 4-bit request is refused with the reason."
    with pytest.raises(ConfigError, match='use_lora=True'): PretrainJob(load_in_8bit=True)
    with pytest.raises(ConfigError, match='both requested'): PretrainJob(load_in_4bit=True, moe_load_in_8bit=True, use_lora=True)
    with pytest.raises(Exception, match='bitsandbytes|CUDA'):
        train_pretrain(PretrainJob(load_in_4bit=True, use_lora=True, device='cpu'), quiet=True)
    assert list(runs_dir.iterdir()) == []

# ---- SFT: evaluation at intervals ----

def test_sft_evaluates_at_intervals(runs_dir):
    "--eval_steps 2: the held-out loss every 2 steps (evaluate events), and the training metrics logged at the same interval."
    assert main(['train', '--mode', 'sft', '--eval_steps', '2', '--max_steps', '4', '--batch_size', '8', '--max_train_examples', '64',
                 '--max_eval_examples', '8', '--no_save_model']) == 0
    (run,) = runs_dir.iterdir()
    log = MetricsLog(run).read()
    assert sorted({l['step'] for l in log if 'eval_loss' in l}) == [2, 4]
    assert [l['step'] for l in log if 'loss' in l] == [1, 2, 4]
