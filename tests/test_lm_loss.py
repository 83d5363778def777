"""The chunked language-model loss (finetune/lm_loss.py) against each model's own loss, on tiny random models: the
same loss (within 1e-5) and gradients for a causal LM, an MLM head and encoder-decoders, with and without LoRA;
evaluation's per-token NLL and top-1 from the logits; label smoothing; trainer.lm_loss_chunk_size=0 and models the
chunked loss cannot reproduce keep their own loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from finetune import lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 50
CHUNK = 5  # fewer than the labelled tokens of a batch: several chunks, the last one partial


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))


def bert_mlm():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def bart():
    from transformers import BartConfig, BartForConditionalGeneration

    model = BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
        pad_token_id=1, decoder_start_token_id=2))
    model.final_logits_bias.normal_()  # added after the output layer: the chunked loss must add it too
    return model


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                               num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0))


def bert2bert():
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

    def side(**kw):
        return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)

    model = EncoderDecoderModel(EncoderDecoderConfig.from_encoder_decoder_configs(side(), side()))
    model.config.decoder_start_token_id, model.config.pad_token_id = 2, 0
    return model


# (builder, shift, trained with LoRA on these modules)
MODELS = {"llama": (llama, 1, ["q_proj", "v_proj", "down_proj"]), "bert_mlm": (bert_mlm, 0, ["query", "value"]),
          "bart": (bart, 0, ["q_proj", "v_proj"]), "t5": (t5, 0, ["q", "v"]),
          "bert2bert": (bert2bert, 0, ["query", "value"])}


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """3 rows of 12 tokens; labels -100 on a prompt, on padding and (MLM-style) here and there."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 12), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[2, 9:] = -100
    labels[1, torch.randperm(12, generator=g)[:4]] = -100
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pair(name: str, lora: bool):
    """The model with the chunked loss and an identical copy with its own loss."""
    build, shift, targets = MODELS[name]
    torch.manual_seed(0)
    model = build()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        for module in model.modules():  # LoRA starts as a no-op: give the adapters weights that change the output
            if hasattr(module, "lora_B"):
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    own = copy.deepcopy(model)
    assert lm_loss.attach(model, shift, CHUNK)
    return model, own


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", MODELS)
def test_chunked_loss_and_gradients_equal_the_models_own(name, lora):
    model, own = pair(name, lora)
    model.train(), own.train()
    inputs = batch()
    chunked, reference = model(**inputs), own(**inputs)
    assert chunked.get("logits") is None  # no tokens x vocabulary logits
    assert abs(chunked.loss.item() - reference.loss.item()) < 1e-5
    chunked.loss.backward()
    reference.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    reference_grads = {n: p.grad for n, p in own.named_parameters() if p.requires_grad}
    assert grads.keys() == reference_grads.keys()
    assert [n for n, g in grads.items() if g is None] == [n for n, g in reference_grads.items() if g is None]
    for n, g in grads.items():  # (the unused encoder pooler of a BERT2BERT has none)
        if g is not None:
            torch.testing.assert_close(g, reference_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert lora or any(g.abs().sum() > 0 for n, g in grads.items() if g is not None and ("embed" in n or "shared" in n))


@pytest.mark.parametrize("name", ["llama", "bert_mlm", "bart"])
def test_evaluation_gives_per_token_nll_and_top1_of_the_labelled_tokens(name):
    model, own = pair(name, lora=False)
    shift = MODELS[name][1]
    inputs = batch(1)
    model.eval(), own.eval()
    with torch.inference_mode():
        out, logits = model(**inputs), own(**inputs).logits
    labels = inputs["labels"]
    targets, logits = labels[:, shift:], logits[:, : logits.shape[1] - shift]
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep], reduction="none")
    assert out.token_nll.shape == out.token_top1.shape == labels.shape
    torch.testing.assert_close(out.token_nll[:, shift:][keep], expected, rtol=1e-5, atol=1e-6)
    assert (out.token_top1[:, shift:][keep] == logits[keep].argmax(-1)).all()
    assert (out.token_nll[:, shift:][~keep] == 0).all() and (out.token_top1[:, shift:][~keep] == -100).all()
    assert lm_loss.token_outputs((out.token_nll, out.token_top1), labels) is not None
    assert lm_loss.token_outputs((logits,), labels) is None
    # what the Trainer passes with gradient accumulation: the loss is the sum over the tokens / num_items_in_batch
    with torch.inference_mode():
        summed = model(**inputs, num_items_in_batch=torch.tensor(100)).loss
    assert abs(summed.item() - expected.sum().item() / 100) < 1e-5


def test_label_smoothing_equals_the_unchunked_smoothed_loss():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, VOCAB)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (23,))
    params = list(head.parameters())
    chunked = lm_loss.chunked_cross_entropy(hidden, head, targets, CHUNK, label_smoothing=0.1, params=params) / 23
    reference = F.cross_entropy(head(hidden), targets, label_smoothing=0.1)
    assert abs(chunked.item() - reference.item()) < 1e-5
    assert abs(chunked.item() - F.cross_entropy(head(hidden), targets).item()) > 1e-3  # smoothing changed it
    for grad, reference_grad in zip(torch.autograd.grad(chunked, [hidden, *params]),
                                    torch.autograd.grad(reference, [hidden, *params])):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-7)


def test_chunk_size_0_keeps_the_models_own_loss_and_logits(tmp_path):
    from datasets import Dataset, DatasetDict

    from finetune.engines import make_engine
    from finetune.tasks import get_task
    from helpers.cli import compose_cfg
    from helpers.models import build_tiny_lm

    path = build_tiny_lm(tmp_path / "lm")
    rows = Dataset.from_dict({"text": ["to be or not to be that is the question"] * 4})
    for size, chunked in (("0", False), ("64", True)):
        cfg = compose_cfg("task=generation", f"model={path}", f"trainer.lm_loss_chunk_size={size}",
                          "trainer.report_to=[]")
        task = get_task(cfg.task)
        tokenizer = task.load_tokenizer(str(path), cfg.model)
        features = task.tokenize(task.prepare(DatasetDict(train=rows, validation=rows), cfg.data), tokenizer)
        model = task.load_model(str(path), cfg.model)
        make_engine(cfg, task, model, tokenizer, features, tmp_path / size)
        with torch.no_grad():
            out = model(**{k: torch.tensor(features["train"][k][:1]) for k in ("input_ids", "labels")})
        assert (out.get("logits") is None) == chunked and out.loss is not None


def test_a_model_that_changes_its_logits_after_the_output_layer_keeps_its_own_loss(caplog):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           final_logit_softcapping=0.5))  # logits = cap * tanh(logits / cap)
    assert not lm_loss.attach(model, 1, CHUNK)
    assert "trainer.lm_loss_chunk_size does not apply" in caplog.text
    out = model(**batch())
    assert out.logits is not None and out.loss is not None
