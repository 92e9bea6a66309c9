"""Tiny random-weight causal LMs built from transformers configs (seconds to build), and a tiny
chat model with its own tokenizer and template, compiled into a package."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

LONG_CONTEXT_MODEL = "llama_long_context"
GEMMA2_MODEL = "gemma2_capped_sliding"
_COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256)

CONFIGS = {
    "llama_mha_tied": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4,
                                                       tie_word_embeddings=True)),
    "llama_mha_untied": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4,
                                                         tie_word_embeddings=False)),
    "llama_gqa_tied": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2,
                                                       tie_word_embeddings=True)),
    "llama_gqa_untied": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2,
                                                         tie_word_embeddings=False)),
    "qwen2_tied": (transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2,
                                                   tie_word_embeddings=True)),
    "qwen2_untied": (transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2,
                                                     tie_word_embeddings=False)),
    "mistral_tied": (transformers.MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2,
                                                       tie_word_embeddings=True)),
    "mistral_untied": (transformers.MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2,
                                                         tie_word_embeddings=False)),
    # Heads of 32 (a whole quantization group of a q8 or q4 KV cache) and an 8k context, for the KV storage
    # and long-context tests.
    LONG_CONTEXT_MODEL: (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                        max_position_embeddings=8192, tie_word_embeddings=False)),
    # Gemma 2: attention scores soft-capped at 1 (its own cap is 50) with weights large enough that the cap changes
    # them, and a sliding window of 8 tokens in every other layer, for the soft-capping and sliding-window tests.
    GEMMA2_MODEL: (transformers.Gemma2Config, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                   attn_logit_softcapping=1.0, initializer_range=0.2, sliding_window=8,
                                                   layer_types=["sliding_attention", "full_attention"])),
}
TINY_MODELS = [name for name in CONFIGS if name not in (LONG_CONTEXT_MODEL, GEMMA2_MODEL)]


def build_tiny(name: str, attn_implementation: str | None = None) -> torch.nn.Module:
    """The tiny model `name`, with the attention implementation asked for (default: sdpa where the family has it,
    eager otherwise)."""
    config_class, extra = CONFIGS[name]
    config = config_class(**{**_COMMON, **extra})
    torch.manual_seed(sum(map(ord, name)))
    implementation = attn_implementation or ("eager" if name == GEMMA2_MODEL else "sdpa")
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation,
                                                          dtype=torch.float32)
    # Random init leaves biases at zero; give Qwen2's q/k/v biases values so the test sees them.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    return model.eval()


def transformers_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int,
                        use_cache: bool = True) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens after `prompt` (EOS ignored) and the log-probability of each."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                             use_cache=use_cache)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [float(torch.log_softmax(step[0].double(), -1)[t]) for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


CHAT_WORDS = "the quick brown fox jumps over the lazy dog while many requests share one batch".split()
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def save_chat_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer trained on CHAT_WORDS, with an EOS token and a chat template."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([" ".join(CHAT_WORDS)] * 20, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|eos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|eos|>",
                                         chat_template=CHAT_TEMPLATE).save_pretrained(folder)


def build_chat_package(folder: Path, seed: int = 0, context: int = 256, targets: tuple[str, ...] = ("cpu",)) -> str:
    """A tiny random Llama (weights drawn with `seed`, `context` positions) with the chat tokenizer, compiled
    for `targets` into `folder`/package."""
    from llmc.compiler import compile_model

    save_chat_tokenizer(folder / "tokenizer")
    # A wide init makes the logits peaked, so greedy choices are far from ties. The config's BOS and EOS are the
    # tokenizer's (transformers' defaults, 1 and 2, are the byte tokens '!' and '"' here).
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                                      initializer_range=0.2, bos_token_id=None, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return str(compile_model(model, folder / "package", targets=list(targets), tokenizer=folder / "tokenizer"))
