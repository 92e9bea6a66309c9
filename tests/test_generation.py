"""Generation on compiled tiny models: token-exact greedy decoding against transformers,
chunked prefill and batched decode equal to the plain path, sampling, stop strings,
streaming text, and clear errors for prompts that do not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import llmc
from llmc.runtime.model import CacheSettings, ContextOverflow
from llmc.runtime.request import StopStrings
from llmc.runtime.sampling import SamplingParams
from llmc.runtime.tokenizer import TextStream, Tokenizer
from tiny_models import GEMMA2_MODEL, TINY_MODELS, transformers_greedy

NEW_TOKENS = 64


@pytest.mark.parametrize("name", TINY_MODELS)
def test_greedy_generation_is_token_exact_with_transformers(tiny_model, tiny_package, name):
    model = tiny_model(name)
    prompt = np.random.default_rng(7).integers(0, model.config.vocab_size, 9).tolist()
    expected, expected_logprobs = transformers_greedy(model, prompt, NEW_TOKENS)
    result = llmc.load(tiny_package(name)).generate(prompt, SamplingParams(max_tokens=NEW_TOKENS))
    assert result.output_ids == expected
    assert np.abs(np.array(result.logprobs) - expected_logprobs).max() <= 1e-3
    assert result.finish_reason == "length"


def test_a_model_with_a_scalar_weight_runs_token_exact(tmp_path):
    """Gemma keeps its embedding scale as a 0-d weight; the runtime hands it to the library as 0-d (it once became
    1-d on the way and the package failed to load)."""
    import transformers

    from llmc.compiler import compile_model

    config = transformers.GemmaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                      max_position_embeddings=256, initializer_range=0.2)
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    prompt = np.random.default_rng(8).integers(0, 512, 9).tolist()
    expected, expected_logprobs = transformers_greedy(model, prompt, 16)
    result = llmc.load(compile_model(model, tmp_path / "pkg")).generate(prompt, SamplingParams(max_tokens=16,
                                                                                               ignore_eos=True))
    assert result.output_ids == expected
    assert np.abs(np.array(result.logprobs) - expected_logprobs).max() <= 1e-3


def test_soft_capped_and_sliding_attention_is_token_exact_with_transformers(tiny_model, tiny_package):
    """Gemma 2's attention-logit soft-capping, at a cap (1) that moves this model's logits by about 1, and its
    sliding window (8 tokens, every other layer) over a prompt of 24 and 16 new tokens: the prompt prefilled in one
    step (the ragged kernel) and in chunks of 8 (the paged prefill over cached keys), then decode. The package
    keeps the model's whole context: the window is attended, not used to cap the context."""
    model = tiny_model(GEMMA2_MODEL)
    prompt = np.random.default_rng(9).integers(0, model.config.vocab_size, 24).tolist()
    expected, expected_logprobs = transformers_greedy(model, prompt, 16)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    for cache in (None, CacheSettings(max_total_tokens=256, prefill_chunk=8)):
        engine = llmc.load(tiny_package(GEMMA2_MODEL), cache=cache)
        assert engine.context_length == model.config.max_position_embeddings
        result = engine.generate(prompt, params)
        assert result.output_ids == expected
        assert np.abs(np.array(result.logprobs) - expected_logprobs).max() <= 1e-3


def test_chunked_prefill_gives_the_same_tokens(tiny_package):
    prompt = np.random.default_rng(8).integers(0, 512, 37).tolist()
    params = SamplingParams(max_tokens=16)
    plain = llmc.load(tiny_package("qwen2_untied"))
    chunked = llmc.load(tiny_package("qwen2_untied"), cache=CacheSettings(max_total_tokens=256, prefill_chunk=5))
    assert chunked.generate(prompt, params).output_ids == plain.generate(prompt, params).output_ids
    np.testing.assert_allclose(chunked.forward(prompt), plain.forward(prompt), atol=1e-5, rtol=0)


def _greedy_alone(engine, prompt, steps):
    return engine.generate(prompt, SamplingParams(max_tokens=steps)).output_ids


def test_two_sequences_decoded_in_one_batch_match_each_alone(tiny_package):
    engine = llmc.load(tiny_package("llama_gqa_untied"))
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, 512, 5).tolist(), rng.integers(0, 512, 11).tolist()]
    alone = [_greedy_alone(engine, p, 12) for p in prompts]
    model, cache = engine.model, engine.model.cache
    seqs = [cache.add_sequence() for _ in prompts]
    logits = model.step(seqs, prompts)
    outputs = [[], []]
    for _ in range(12):
        tokens = [int(np.argmax(row)) for row in logits]
        for out, token in zip(outputs, tokens):
            out.append(token)
        logits = model.step(seqs, [[t] for t in tokens])
    for seq in seqs:
        cache.remove_sequence(seq)
    assert outputs == alone


def test_sampling_is_reproducible_with_a_seed_and_varies_without(tiny_package):
    engine = llmc.load(tiny_package("mistral_tied"))
    prompt = [1, 2, 3, 4]
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=123)
    first = engine.generate(prompt, params).output_ids
    assert engine.generate(prompt, params).output_ids == first
    others = {tuple(engine.generate(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=s)).output_ids)
              for s in range(4)}
    assert len(others) > 1


def test_repetition_penalty_changes_greedy_choices(tiny_package):
    engine = llmc.load(tiny_package("llama_mha_untied"))
    prompt = [5, 6, 7]
    plain = engine.generate(prompt, SamplingParams(max_tokens=24)).output_ids
    penalized = engine.generate(prompt, SamplingParams(max_tokens=24, repetition_penalty=5.0)).output_ids
    assert plain != penalized
    assert len(set(penalized)) >= len(set(plain))


def test_prompt_longer_than_the_context_is_a_clear_error(tiny_package):
    engine = llmc.load(tiny_package("llama_mha_tied"))
    with pytest.raises(ContextOverflow, match="maximum context length is 256 tokens"):
        engine.generate(list(range(300)))
    with pytest.raises(ContextOverflow, match="context window of 256"):
        engine.forward(list(range(257)))


def test_a_request_that_could_pass_the_context_is_refused_as_the_server_does(tiny_package):
    engine = llmc.load(tiny_package("llama_mha_tied"))
    with pytest.raises(ContextOverflow, match=r"requested 300 tokens \(250 in the prompt, 50 in the completion\)"):
        engine.generate(list(range(250)), SamplingParams(max_tokens=50))
    result = engine.generate(list(range(250)), SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(result.output_ids) == 6 and result.finish_reason == "length"


def test_token_ids_outside_the_vocabulary_are_refused(tiny_package):
    engine = llmc.load(tiny_package("llama_mha_tied"))
    with pytest.raises(llmc.LlmcError, match="outside the vocabulary"):
        engine.forward([1, 2, 100000])


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory) -> Tokenizer:
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["héllo wörld ünïcode", "日本語のテキスト", "emoji 🎉🚀 text"] * 10
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    backend.save(str(path))
    return Tokenizer(path)


def test_streamed_text_never_splits_a_character(byte_tokenizer):
    text = "naïve 日本語 🎉 café 🚀!"
    ids = byte_tokenizer.encode(text)
    stream = TextStream(byte_tokenizer)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == byte_tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 0


def test_stop_strings_cut_the_text_and_hold_back_partial_matches():
    stops = StopStrings(["END", "\n\n"])
    emitted = []
    for delta in ["Hello E", "N", "x and more\n", "\nnever"]:
        text, stopped = stops.push(delta)
        emitted.append(text)
        if stopped:
            break
    assert "".join(emitted) == "Hello ENx and more"
    assert stopped and stops.text == "Hello ENx and more"
