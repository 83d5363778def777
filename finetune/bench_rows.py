"""The rows of python -m finetune.bench (finetune/bench.py describes them): each row's config overrides, padding and
description, and the shapes of the larger models the memory rows build with random weights."""

from __future__ import annotations

from pathlib import Path

# public data files beside the repository (not shipped); "{shared}" in a row's overrides points there
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
WNUT = "{shared}/wnut17"
SQUAD = "{shared}/squad_v1.1/train.json"
MULTI30K = "{shared}/multi30k_en_de"
SCITLDR = "{shared}/scitldr"
HH_RLHF = "{shared}/hh_rlhf_harmless/pairs.jsonl.gz"
GOEMOTIONS = "{shared}/goemotions"

# the tasks' own micro-batches (one 512-token block, one document, 4 pairs), fewer of them a step
_GEN = ["trainer.max_steps=3", "trainer.per_device_train_batch_size=1", "trainer.gradient_accumulation_steps=2",
        "task.eval_prompts=8"]
_S2S = ["trainer.gradient_accumulation_steps=2", "data.max_train_samples=512", "data.max_eval_samples=16"]
# (rows of other tasks set their micro-batch: --batch-size is the MiniLM rows', far too many SmolLM2 tokens for memory:
# docs/benchmarks.md#bench-table)
_MEM = ["task=generation", "trainer.per_device_train_batch_size=1", "trainer.gradient_accumulation_steps=1",
        "trainer.max_steps=2"]
# 2 pairs a micro-batch (chosen and rejected: 4 sequences), 2 a step; the reference pass covers the 32 training pairs
_PREF = ["task=preference", f"data.source={HH_RLHF}", "data.max_train_samples=32", "data.max_eval_samples=16",
         "data.max_test_samples=16", "trainer.max_steps=4", "trainer.per_device_train_batch_size=2",
         "trainer.gradient_accumulation_steps=2", "task.eval_prompts=2"]
_CKPT, _LORA_BF16 = "trainer.gradient_checkpointing=true", ["peft=lora", "model.dtype=bfloat16"]
# the optimizer rows: full fine-tuning at the task's micro-batch, 6 steps (their train loss compares after equal steps)
_OPT = [*_MEM, "trainer.max_steps=6"]
_LEAN = ["trainer.optim=adamw_8bit", "model.dtype=bfloat16", "trainer.optimizer_in_backward=true",
         "trainer.max_grad_norm=0"]
_LEAN_ADAFACTOR = ["trainer.optim=adafactor", *_LEAN[1:]]
EXPORTED = ("default",)  # rows that also export and re-score through the pipeline (the bench's time goes to training)
# name -> (config overrides, pad every example to this length or None, description)
ROWS: dict[str, tuple[list[str], int | None, str]] = {
    "default": ([], None, "dynamic padding, length-grouped (trainer=hf)"),
    "accelerate": (["trainer=accelerate"], None, "dynamic padding, length-grouped (trainer=accelerate)"),
    "run_glue": (["trainer.group_by_length=false", "trainer.max_steps=6", "data.max_test_samples=300"], 128,
                 "pad to 128, random order (HF run_glue.py defaults), 6 steps, 300 test sentences"),
    "lora": (["peft=lora"], None, "default + peft=lora (configs/peft/lora.yaml)"),
    "ner": (["task=ner", f"data.train_file={WNUT}/wnut17train.conll", f"data.test_file={WNUT}/emerging.dev.conll",
             "trainer.max_steps=40"], None, "task=ner, WNUT-17 train / emerging.dev as test, 40 steps"),
    "qa": (["task=qa", f"data.source={SQUAD}", "data.group_column=title", "task.max_seq_length=256",
            "task.doc_stride=64", "data.max_test_samples=300", "trainer.max_steps=10"],
           None, "task=qa, SQuAD v1.1 split by article, 256-token windows, 300 test questions, 10 steps"),
    "multi_label": (["task=classification", "data=custom", f"data.train_file={GOEMOTIONS}/train.tsv.gz",
                     f"data.test_file={GOEMOTIONS}/dev.tsv.gz", "data.column_names=[text,labels,id]",
                     "data.label_column=labels", f"data.label_names_file={GOEMOTIONS}/labels.txt",
                     "data.max_eval_samples=1000", "data.max_test_samples=1000"], None,
                    "task=classification, GoEmotions multi-label (28 labels), tuned thresholds, 1,000 dev comments"),
    "mlm": (["task=mlm", "trainer.max_steps=30", "data.max_test_samples=500"], None,
            "task=mlm, 15% of tokens masked, length-grouped, 500 test snippets, 30 steps"),
    "generation": (["task=generation", *_GEN], None, "task=generation, SmolLM2 on Hamlet, 2 x 1 x 512 tokens, 3 steps"),
    "generation_lora": (["task=generation", *_GEN, "peft=lora"], None, "the same with peft=lora"),
    "translation": (["task=translation", f"data.source={MULTI30K}", *_S2S, "trainer.max_steps=6",
                     "trainer.per_device_train_batch_size=4", "data.max_test_samples=16"],
                    None, "task=translation, SmolLM2 on Multi30k en->de, 2 x 4 pairs, 6 steps, 16 test sentences"),
    "summarization": (["task=summarization", f"data.source={SCITLDR}", *_S2S, "trainer.max_steps=4",
                       "trainer.per_device_train_batch_size=1", "data.max_test_samples=8"],
                      None, "task=summarization, SmolLM2 on SciTLDR, 2 x 1 pair, 4 steps, 8 test abstracts"),
    "preference": (_PREF, None, "task=preference (DPO), SmolLM2 full fine-tuning on hh-rlhf pairs, 4 x 2 x 2 pairs"),
    "preference_lora": ([*_PREF, "peft=lora"], None, "the same with peft=lora (reference: the adapter disabled)"),
    "preference_two_pass": ([*_PREF, "task.concatenate=false"], None,
                            "the same as preference, chosen and rejected in two forward passes"),
    # memory rows: they train only (no evaluation), on Hamlet's 512-token blocks
    "mem_135m": (_MEM, None, "SmolLM2-135M full fine-tuning, the task's micro-batch (1 x 512 tokens), 2 steps"),
    "mem_135m_4x512": ([*_MEM, "trainer.per_device_train_batch_size=4"], None,
                       "SmolLM2-135M full fine-tuning, 4 x 512 tokens, 2 steps"),
    "mem_135m_ckpt": ([*_MEM, "trainer.per_device_train_batch_size=4", _CKPT], None,
                      "the same (4 x 512), gradient checkpointing"),
    "mem_135m_lora": ([*_MEM, "trainer.per_device_train_batch_size=4", "peft=lora"], None,
                      "SmolLM2-135M LoRA on its fp32 weights, 4 x 512 tokens, 2 steps"),
    "mem_135m_lora_bf16": ([*_MEM, "trainer.per_device_train_batch_size=4", *_LORA_BF16], None,
                           "SmolLM2-135M LoRA on a bf16 base, 4 x 512 tokens, 2 steps"),
    "mem_135m_lora_bf16_ckpt": ([*_MEM, "trainer.per_device_train_batch_size=4", *_LORA_BF16, _CKPT], None,
                                "SmolLM2-135M LoRA on a bf16 base, gradient checkpointing, 4 x 512 tokens, 2 steps"),
    "mem_135m_opt_adamw": (_OPT, None, "SmolLM2-135M full fine-tuning, AdamW, 1 x 512 tokens, 6 steps"),
    "mem_135m_opt_adamw_8bit": ([*_OPT, "trainer.optim=adamw_8bit"], None, "the same, 8-bit AdamW"),
    "mem_135m_opt_adafactor": ([*_OPT, "trainer.optim=adafactor"], None, "the same, Adafactor"),
    "mem_135m_opt_sgd": ([*_OPT, "trainer.optim=sgd", "trainer.learning_rate=1e-2"], None,
                         "the same, SGD (momentum 0.9, lr 1e-2)"),
    "mem_135m_opt_bf16": ([*_OPT, "model.dtype=bfloat16"], None, "the same, AdamW, bf16 weights rounded stochastically"),
    "mem_135m_opt_8bit_bf16": ([*_OPT, "trainer.optim=adamw_8bit", "model.dtype=bfloat16"], None,
                               "the same, 8-bit AdamW, bf16 weights rounded stochastically"),
    "mem_135m_opt_adafactor_bf16": ([*_OPT, "trainer.optim=adafactor", "model.dtype=bfloat16"], None,
                                    "the same, Adafactor, bf16 weights rounded stochastically"),
    "mem_135m_opt_lean": ([*_OPT, *_LEAN], None, "the same, 8-bit AdamW, bf16 weights, step inside backward, no clipping"),
    "mem_360m": (_MEM, None, "360M shape (random weights), full fine-tuning, 1 x 512 tokens, 2 steps"),
    "mem_360m_opt_adamw": (_OPT, None, "360M shape (random weights), full fine-tuning, AdamW, 1 x 512, 6 steps"),
    "mem_360m_opt_lean": ([*_OPT, *_LEAN], None, "the same, 8-bit AdamW, bf16 weights, step inside backward"),
    "mem_1.7b_opt_lean": ([*_OPT, *_LEAN, "trainer.max_steps=3"], None,
                          "1.7B shape (random weights), 8-bit AdamW, bf16 weights, step inside backward, 3 steps"),
    "mem_360m_opt_adafactor_lean": ([*_OPT, *_LEAN_ADAFACTOR], None,
                                    "360M shape, Adafactor, bf16 weights, step inside backward"),
    "mem_360m_opt_adafactor_lean_ckpt": ([*_OPT, *_LEAN_ADAFACTOR, _CKPT], None, "the same, checkpointing"),
    "mem_1.7b_opt_adafactor_lean_ckpt": ([*_OPT, *_LEAN_ADAFACTOR, "trainer.max_steps=3", _CKPT], None,
                                         "1.7B shape, Adafactor, bf16 weights, step inside backward, checkpointing"),
    "mem_1.7b_opt_lean_ckpt": ([*_OPT, *_LEAN, "trainer.max_steps=3", _CKPT], None, "the same, checkpointing"),
    "mem_360m_ckpt": ([*_MEM, _CKPT], None, "the same, gradient checkpointing"),
    "mem_1.7b_lora_bf16_ckpt": ([*_MEM, *_LORA_BF16, _CKPT], None,
                                "1.7B shape (random weights), LoRA on a bf16 base, checkpointing, 1 x 512, 2 steps"),
}
# memory rows with another model's shape: SmolLM2-360M's and SmolLM2-1.7B's (their config.json), built with random
# weights from SmolLM2-135M's config (the same Llama family, 49,152-token vocabulary, tied embeddings): no download
SHAPES = {"mem_360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                           num_key_value_heads=5),
          "mem_1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                           num_key_value_heads=32)}


def row_overrides(name: str, steps: int, batch_size: int, extra: list[str]) -> list[str]:
    """The config overrides a row trains with: a row's own (steps, batch size) win over --steps / --batch-size."""
    own = [o.replace("{shared}", str(SHARED_DATA)) for o in ROWS[name][0]]
    # no validation pass or checkpoint while training: a run does them, but they are not training speed
    return [f"trainer.max_steps={steps}", f"trainer.per_device_train_batch_size={batch_size}", *own, *extra,
            "trainer.eval_strategy=no"]
