"""Tiny random-weight causal LMs built from transformers configs (seconds to build)."""

from __future__ import annotations

import torch
import transformers

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
}
TINY_MODELS = list(CONFIGS)


def build_tiny(name: str, attn_implementation: str = "sdpa") -> torch.nn.Module:
    config_class, extra = CONFIGS[name]
    config = config_class(**_COMMON, **extra)
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                          dtype=torch.float32)
    # Random init leaves biases at zero; give Qwen2's q/k/v biases values so the test sees them.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    return model.eval()
