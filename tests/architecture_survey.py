"""Every causal-LM architecture transformers knows, tried the way a new user would: a tiny random-weight config of
the family (2 layers, small widths, the family's defaults otherwise), compiled by llmc for the CPU and decoded
greedily against transformers' `generate`. Variants add what no family's defaults exercise (rotary scaling).

Each architecture gets one verdict:
- `exact`: llmc's greedy tokens equal transformers' (and its log-probabilities agree to 1e-3);
- `refused`: llmc refused it at compile time with an error that names what it does not support;
- `broken`: anything else (a crash, a refusal at run time, other tokens) — a defect;
- `untestable`: transformers itself could not build or run the tiny model, so there is nothing to compare with;
- `out of scope`: not a text decoder (vision, audio, encoder-decoder halves, masked-LM encoders).

tests/test_architectures.py checks every in-scope architecture against the table that tests/write_architectures.py
writes to tests/ARCHITECTURES.md."""

from __future__ import annotations

import multiprocessing
import os
import re
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import transformers
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from tiny_models import transformers_greedy

VOCAB = 512
PROMPT_TOKENS = 9
NEW_TOKENS = 16
LOGPROB_TOLERANCE = 1e-3
MAX_PARAMETERS = 5_000_000
VERDICTS = ("exact", "refused", "broken", "untestable")

# The tiny widths, under the names configs share (a family's own names are reached through its attribute_map).
# Only the names a family's config has are passed to it.
TINY_SIZES = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, max_window_layers=2,
    # a sliding window shorter than prompt + new tokens, so that windowed families attend past it
    sliding_window=16,
    # partial rotary (GPT-J, CodeGen) and multi-head latent attention (DeepSeek V2/V3 and their kin)
    rotary_dim=8, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
    # mixture-of-experts families
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, n_shared_experts=1,
)

# What a family needs beyond TINY_SIZES for its config to validate at 2 layers.
FAMILY_SIZES = {
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=16),
}

# Mechanisms that no family's defaults exercise, tried on a family that has them as options: rotary scaling.
ROPE_THETA = 10000.0
VARIANTS = {
    "llama+rope_linear": ("llama", dict(rope_type="linear", factor=4.0)),
    "llama+rope_dynamic": ("llama", dict(rope_type="dynamic", factor=4.0, original_max_position_embeddings=16)),
    "llama+rope_yarn": ("llama", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)),
    "llama+rope_llama3": ("llama", dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=64)),
    "llama+rope_longrope": ("llama", dict(rope_type="longrope", long_factor=[1.5] * 8, short_factor=[1.0] * 8,
                                           original_max_position_embeddings=16)),
}

# Architectures whose causal-LM class is not a text decoder, beyond what the rules in `out_of_scope` find.
NOT_TEXT_DECODERS = {
    "trocr": "the text decoder of a vision encoder-decoder (TrOCR)",
    "moshi": "a speech-text model over audio codes",
}


@dataclass(frozen=True)
class Outcome:
    model_type: str
    class_name: str
    verdict: str
    detail: str


def causal_lm_architectures() -> dict[str, str]:
    """model_type (or variant name) -> the class transformers builds for it as a causal LM."""
    families = dict(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    return {**families, **{name: families[family] for name, (family, _) in VARIANTS.items()}}


def out_of_scope(model_type: str, class_name: str) -> str | None:
    """Why the architecture is not a text decoder, or None when it is one."""
    if model_type in VARIANTS:
        return None
    if model_type in NOT_TEXT_DECODERS:
        return NOT_TEXT_DECODERS[model_type]
    if model_type in modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES:
        return "the decoder half of a speech encoder-decoder"
    if model_type in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "the decoder half of an encoder-decoder"
    if model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "a masked-LM encoder (its causal-LM head is for encoder-decoder use)"
    if class_name.endswith("ConditionalGeneration"):
        return "a multimodal model"
    try:
        config = CONFIG_MAPPING[model_type]()
    except Exception:  # judged by the build instead, which reports why
        return None
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder"
    media = [name for name in ("vision_config", "audio_config") if getattr(config, name, None) is not None]
    if media or getattr(config, "text_config", None) is not None:
        return "a multimodal model (" + (", ".join(media) or "text_config") + ")"
    return None


def tiny_config(model_type: str) -> transformers.PretrainedConfig:
    """The family's config (or a variant's) with tiny widths, and its special token ids inside the tiny
    vocabulary."""
    family, rope = VARIANTS.get(model_type, (model_type, None))
    config_class = CONFIG_MAPPING[family]
    defaults = config_class()
    settable = {name: value for name, value in TINY_SIZES.items()
                if hasattr(defaults, name) and not isinstance(getattr(config_class, name, None), property)}
    if rope is not None:
        settable["rope_parameters"] = {"rope_theta": ROPE_THETA, **rope}
    config = config_class(**settable, **FAMILY_SIZES.get(family, {}))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= VOCAB:
            setattr(config, name, VOCAB - 1)
        elif isinstance(value, list):
            setattr(config, name, [v if v < VOCAB else VOCAB - 1 for v in value])
    return config


def build_model(model_type: str) -> torch.nn.Module:
    """The tiny model, with seeded random weights. A family whose config ignores the generic size names would come
    out full size, so its size is counted on the meta device first."""
    config = tiny_config(model_type)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    if parameters > MAX_PARAMETERS:
        raise ValueError(f"the tiny config still has {parameters / 1e6:.0f}M parameters: the family's config "
                         "ignores the generic size names")
    torch.manual_seed(sum(map(ord, model_type)))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Some families initialise a matrix to zero (AFMoE's router), which ties every expert's score, and top-k has no
    # defined order among ties: give such matrices random values, as training would.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2 and not parameter.any():
                parameter.normal_(0, 0.02)
    return model


def prompt_for(model_type: str) -> list[int]:
    return np.random.default_rng(sum(map(ord, model_type))).integers(3, VOCAB - 1, PROMPT_TOKENS).tolist()


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(error).__name__}: {line}"[:300]


def try_architecture(model_type: str, class_name: str, workdir: Path) -> Outcome:
    """Build the tiny model, run transformers' greedy decode, then compile with llmc and decode the same prompt."""
    import llmc
    from llmc.compiler import compile_model
    from llmc.ir import LlmcError
    from llmc.runtime.sampling import SamplingParams

    def outcome(verdict: str, detail: str) -> Outcome:
        return Outcome(model_type, class_name, verdict, detail)

    try:
        model = build_model(model_type)
        prompt = prompt_for(model_type)
        # Without transformers' cache: hybrid families whose two tiny layers hold no attention layer fail with it.
        expected, expected_logprobs = transformers_greedy(model, prompt, NEW_TOKENS, use_cache=False)
    except Exception as error:
        return outcome("untestable", f"transformers: {first_line(error)}")
    try:
        package = compile_model(model, workdir / model_type)
    except LlmcError as error:
        return outcome("refused", str(error).splitlines()[0][:300])
    except Exception as error:
        return outcome("broken", f"compile raised {first_line(error)}")
    try:
        result = llmc.load(package).generate(prompt, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    except Exception as error:
        return outcome("broken", f"generation raised {first_line(error)}")
    if result.output_ids != expected:
        same = next((i for i, (a, b) in enumerate(zip(result.output_ids, expected)) if a != b), len(expected))
        return outcome("broken", f"tokens differ from transformers' from token {same} on")
    gap = float(np.abs(np.array(result.logprobs) - expected_logprobs).max())
    if gap > LOGPROB_TOLERANCE:
        return outcome("broken", f"same tokens, but log-probabilities differ by up to {gap:.2g}")
    return outcome("exact", f"{NEW_TOKENS} greedy tokens equal; log-probabilities within {gap:.1g}")


def _start_worker() -> None:
    """One thread per worker process, so that the workers share the cores."""
    os.environ["TVM_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()


def _survey_one(model_type: str) -> Outcome:
    class_name = causal_lm_architectures()[model_type]
    reason = out_of_scope(model_type, class_name)
    if reason:
        return Outcome(model_type, class_name, "out of scope", reason)
    with tempfile.TemporaryDirectory() as folder:
        return try_architecture(model_type, class_name, Path(folder))


def survey(model_types: list[str], workers: int = 2) -> Iterator[Outcome]:
    """The outcome of each of `model_types`, in their order, tried in `workers` processes at once: a compile is
    mostly single-threaded, and a process of its own keeps one model's failure from the others."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker) as pool:
        yield from pool.map(_survey_one, model_types)


TABLE_ROW = re.compile(r"^\| `(?P<type>[^`]+)` \| `(?P<cls>[^`]+)` \| (?P<verdict>[a-z ]+) \| (?P<detail>.*) \|$")


def recorded_verdicts(table: Path) -> dict[str, str]:
    """model_type -> verdict, as tests/ARCHITECTURES.md records it."""
    rows = (TABLE_ROW.match(line) for line in table.read_text().splitlines())
    return {row["type"]: row["verdict"] for row in rows if row}
