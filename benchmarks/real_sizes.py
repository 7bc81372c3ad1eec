"""One DiagGGNApprox step on vision models at their real widths (random weights).

The real-model tests use tiny configs; this script builds torchvision, timm and
Hugging Face transformers models by their own constructors at full width (the
transformers with two layers, 128 tokens, 224×224 images), and times one
plain step and one DiagGGNApprox step (a new ``extend`` block, as the README
tells users), and lists the operations and modules that took the slow paths
(dense per-sample Jacobians, the fallback). Single runs: the first step's plan
building is included. Cap the memory (``ulimit -v``) when trying a new model:
a dense path can ask for tens of gigabytes.

Usage::

    python -m benchmarks.real_sizes tv.swin_v2_t:64 tv.maxvit_t:224 timm.convnextv2_atto:64
    python -m benchmarks.real_sizes hf.bert hf.llama hf.t5 hf.vit
    python -m benchmarks.real_sizes --list     # the hf.* names
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import DiagGGNApprox

TOKENS, DECODER_TOKENS, CLASSES = 128, 32, 10

# hf.<name>: (model class, config class, config overrides, input kind). The widths are
# those of the named checkpoint; two layers (and vocabularies of at most 32k where the
# checkpoint's is larger than that, marked), random weights.
HF = {
    "bert": ("BertForSequenceClassification", "BertConfig", dict(num_hidden_layers=2), "text"),  # bert-base
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig",
                dict(num_hidden_layers=2, vocab_size=50265, max_position_embeddings=514, pad_token_id=1), "text"),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig", dict(n_layers=2), "text"),
    "albert": ("AlbertForSequenceClassification", "AlbertConfig",  # albert-base-v2 (one layer, shared)
               dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=2), "text"),
    "electra": ("ElectraForSequenceClassification", "ElectraConfig", dict(num_hidden_layers=2), "text"),  # electra-small
    "mobilebert": ("MobileBertForSequenceClassification", "MobileBertConfig", dict(num_hidden_layers=2), "text"),
    "mpnet": ("MPNetForSequenceClassification", "MPNetConfig", dict(num_hidden_layers=2), "text"),
    "deberta_v2": ("DebertaV2ForSequenceClassification", "DebertaV2Config", dict(  # deberta-v3-base
        hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072, vocab_size=128100,
        relative_attention=True, position_buckets=256, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False), "text"),
    "modernbert": ("ModernBertForSequenceClassification", "ModernBertConfig", dict(num_hidden_layers=2), "text"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_layer=2), "causal"),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(num_hidden_layers=2), "causal"),  # opt-125m
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(  # pythia-160m
        hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072, vocab_size=32000), "causal"),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(hidden_size=1024, n_layer=2, n_head=16, vocab_size=32000), "causal"),
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(  # falcon-rw-1b, vocabulary 32k (50,304)
        hidden_size=2048, num_attention_heads=32, num_hidden_layers=2, alibi=True, multi_query=False,
        parallel_attn=False, bias=True, vocab_size=32000), "causal"),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(  # TinyLlama-1.1B
        hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
        num_hidden_layers=2, vocab_size=32000), "causal"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(  # Qwen2-0.5B, vocabulary 32k (151,936)
        hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=32000, tie_word_embeddings=True), "causal"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(  # gemma-2b, vocabulary 32k (256,000)
        hidden_size=2048, intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
        num_hidden_layers=2, vocab_size=32000), "causal"),
    "phi": ("PhiForCausalLM", "PhiConfig", dict(num_hidden_layers=2, vocab_size=32000), "causal"),  # phi-1.5
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(num_layers=2, num_decoder_layers=2), "seq2seq"),  # t5-small
    "bart": ("BartForSequenceClassification", "BartConfig", dict(  # bart-base
        d_model=768, encoder_layers=2, decoder_layers=2, encoder_attention_heads=12, decoder_attention_heads=12,
        encoder_ffn_dim=3072, decoder_ffn_dim=3072), "bart"),
    "vit": ("ViTForImageClassification", "ViTConfig", dict(num_hidden_layers=2), "image"),  # vit-base-patch16-224
    "beit": ("BeitForImageClassification", "BeitConfig", dict(num_hidden_layers=2, use_relative_position_bias=True), "image"),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config", dict(num_hidden_layers=2, image_size=224), "image"),
    "clip": ("CLIPForImageClassification", "CLIPConfig", dict(vision_config=dict(num_hidden_layers=2)), "image"),
    "swin": ("SwinForImageClassification", "SwinConfig", {}, "image"),  # swin-tiny, all layers
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig", {}, "image"),  # convnext-tiny
}


def build_hf(name: str, batch: int):
    """``(model, inputs, loss)`` of ``hf.<name>``: eval mode, random tokens or images, cross-entropy."""
    import transformers

    model_cls, config_cls, overrides, kind = HF[name]
    config = getattr(transformers, config_cls)(**overrides)
    if kind in ("text", "bart", "image"):
        config.num_labels = CLASSES
    model = getattr(transformers, model_cls)(config).eval()
    if kind == "image":
        X = {"pixel_values": torch.randn(batch, 3, 224, 224)}
        y = torch.randint(0, CLASSES, (batch,))
        return model, X, lambda out: nn.functional.cross_entropy(out.logits, y)
    vocab = config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (batch, TOKENS))
    if kind == "bart":
        ids[:, -1] = config.eos_token_id
    if kind in ("text", "bart"):
        y = torch.randint(0, CLASSES, (batch,))
        return model, {"input_ids": ids}, lambda out: nn.functional.cross_entropy(out.logits, y)
    X = {"input_ids": ids, "use_cache": False}
    if kind == "seq2seq":
        X["decoder_input_ids"] = torch.randint(3, vocab, (batch, DECODER_TOKENS))
    labels = torch.randint(0, vocab, X.get("decoder_input_ids", ids).shape)
    return model, X, lambda out: nn.functional.cross_entropy(out.logits.reshape(-1, vocab), labels.reshape(-1))


def build(name: str, size: int) -> nn.Module:
    """``tv.<torchvision constructor>`` or ``timm.<timm model name>``, 10 classes, eval mode."""
    if name.startswith("tv."):
        import torchvision

        return getattr(torchvision.models, name[3:])(num_classes=10).eval()
    import timm

    try:
        return timm.create_model(name[5:], num_classes=10, img_size=size).eval()
    except TypeError:  # models without an img_size argument
        return timm.create_model(name[5:], num_classes=10).eval()


def run(name: str, size: int, batch: int, steps: int = 1) -> None:
    """Time ``steps`` pairs of a plain step and a DiagGGNApprox step (a new ``extend`` block
    each) of one model, and print a line per pair; the first includes building the plan."""
    torch.manual_seed(0)
    if name.startswith("hf."):
        model, inputs, loss = build_hf(name[3:], batch)
        shape = "224×224" if HF[name[3:]][3] == "image" else f"{TOKENS} tokens"
        forward, where = lambda: loss(model(**inputs)), f" ({shape}, batch {batch})"
    else:
        model = build(name, size)
        X, y = torch.randn(batch, 3, size, size), torch.randint(0, CLASSES, (batch,))
        forward, where = lambda: nn.functional.cross_entropy(model(X), y), f" ({size}×{size}, batch {batch})"
    for _ in range(steps):
        _pair(model, forward, name, where)


def _forget_cached_biases(model: nn.Module) -> None:
    """timm's attention biases kept from the step before (LeViT, EfficientViT in eval mode: a
    tensor whose graph that step's backward freed; docs/supported.md)."""
    for m in model.modules():
        if isinstance(getattr(m, "attention_bias_cache", None), dict):
            m.attention_bias_cache = {}


def _pair(model: nn.Module, forward, name: str, where: str) -> None:
    _forget_cached_biases(model)
    start = time.perf_counter()
    forward().backward()
    plain = time.perf_counter() - start
    model.zero_grad()
    _forget_cached_biases(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        try:
            with extend(model, DiagGGNApprox()):
                forward().backward()
            result = f"DiagGGNApprox {time.perf_counter() - start:.2f} s"
        except Exception as err:  # noqa: BLE001 - reported, the next model runs
            result = f"{type(err).__name__}: {str(err)[:200]}"
    slow = sorted({str(w.message).split(":")[0] for w in caught if "closed-form" in str(w.message) or "no rule" in str(w.message)})
    print(f"{name}{where}: plain {plain:.2f} s, {result}")
    for line in slow:
        print(f"    slow path: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="name:image_size, e.g. tv.swin_v2_t:64 or timm.levit_128s:224; hf.<name>")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--list", action="store_true", help="list the hf.* names and exit")
    parser.add_argument("--steps", type=int, default=1, help="pairs of steps per model (the first builds the plan)")
    args = parser.parse_args()
    if args.list:
        print(" ".join(f"hf.{name}" for name in HF))
        return
    for spec in args.models:
        name, _, size = spec.partition(":")
        run(name, int(size or 64), args.batch, args.steps)


if __name__ == "__main__":
    main()
