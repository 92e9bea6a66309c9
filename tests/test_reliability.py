"""Reliability, as a hostile user tries it: every bad input gets a clear error with the right status
(never a traceback, a 5xx or a hang); one request's failure stays its own and the engine goes on;
an engine that dies says so at once and stops the server; the CLI and the server apply the same
rules with the same messages; packages are written atomically, checked whole, and refused when
any of their files is damaged; a checkpoint must supply every parameter; and a seeded fuzzer
sends 2,000 mutated requests to one server, which answers each with a 4xx or a valid 200."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import llmc
from llmc.runtime.model import CacheSettings
from llmc.inspection import load_ir
from llmc.runtime.package import GRAPH_FILE, METADATA_FILE, Package, PackageError
from llmc.runtime.sampling import Sampler, SamplingParams
from llmc.runtime.server import ServerLimits
from server_process import MODEL, ServerThread, free_port, start_server
from tiny_models import CHAT_WORDS, build_tiny, save_chat_tokenizer

GREEDY = SamplingParams(max_tokens=8)
CACHE = CacheSettings(max_total_tokens=2048, max_batch_size=8, prefill_chunk=64)


def llmc_cli(*args: str | bytes, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], capture_output=True, timeout=timeout,
                          env=env, cwd="/")


def clean_failure(result: subprocess.CompletedProcess, fragment: str) -> None:
    errors = result.stderr.decode(errors="replace")
    assert result.returncode == 1, errors
    assert "Traceback" not in errors and "Traceback" not in result.stdout.decode(errors="replace")
    assert fragment in " ".join(errors.split()), errors


@pytest.fixture(scope="module")
def server(chat_package):
    with ServerThread(chat_package, CACHE, ServerLimits(max_body_bytes=2**20, body_timeout_s=1.0)) as s:
        yield s


def post(server: ServerThread, body: dict | str, path: str = "/v1/chat/completions") -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)


def chat_body(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "the quick brown fox"}], "max_tokens": 8,
            "temperature": 0, **fields}


def assert_still_serving(server: ServerThread, chat_package: str) -> None:
    """The server answers, alive, with what the model gives the same request alone."""
    assert httpx.get(server.url + "/health").status_code == 200
    reply = post(server, chat_body())
    assert reply.status_code == 200, reply.text
    alone = llmc.load(chat_package).chat([{"role": "user", "content": "the quick brown fox"}], GREEDY).text
    assert reply.json()["choices"][0]["message"]["content"] == alone


# -- one rule for every number, on the command line and in the API -----------------------------------
RULES = [  # (CLI arguments, API fields, the message both give)
    (["--seed", "-1"], {"seed": -1}, "seed must be between 0 and"),
    (["--temperature", "nan"], '{"temperature": NaN}', "temperature must be a finite number, got nan"),
    (["--temperature", "inf"], '{"temperature": Infinity}', "temperature must be a finite number, got inf"),
    (["--top-k", "-3"], {"top_k": -3}, "top_k must be at least -1, got -3"),
    (["--top-p", "0"], {"top_p": 0}, "top_p must be in (0, 1], got 0"),
    (["--repetition-penalty", "0"], {"repetition_penalty": 0}, "repetition_penalty must be positive"),
    (["-n", "0"], {"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
]


@pytest.mark.parametrize("cli_args, api_fields, message", RULES)
def test_the_cli_and_the_server_refuse_a_bad_parameter_alike(server, chat_package, cli_args, api_fields, message):
    clean_failure(llmc_cli("run", chat_package, "hello", *cli_args, timeout=60), message)
    if isinstance(api_fields, str):  # NaN and Infinity: Python's JSON parser takes them, JSON does not
        body = json.dumps(chat_body())[:-1] + ", " + api_fields[1:]
    else:
        body = chat_body(**api_fields)
    reply = post(server, body)
    assert reply.status_code == 400 and message in reply.json()["error"]["message"], reply.text


@pytest.mark.parametrize("command, message", [
    (["serve", "--port", "99999"], "port must be between 0 and 65535, got 99999"),
    (["serve", "--max-batch", "0"], "max_batch must be at least 1, got 0"),
    (["serve", "--step-tokens", "0"], "step_tokens must be at least 1, got 0"),
    (["serve", "--threads", "0"], "threads must be at least 1, got 0"),
    (["run", "--threads", "-1"], "threads must be at least 1, got -1"),
    (["serve", "--max-body-mb", "nan"], "max_body_mb must be a finite number"),
])
def test_limits_are_checked_before_any_work(chat_package, command, message):
    started = time.monotonic()
    result = llmc_cli(command[0], chat_package, *(["hello"] if command[0] == "run" else []), *command[1:], timeout=60)
    clean_failure(result, message)
    assert time.monotonic() - started < 20


def test_a_temperature_too_small_to_divide_by_is_greedy(server, chat_package):
    engine = llmc.load(chat_package)
    tiny = engine.generate("the lazy dog", SamplingParams(max_tokens=8, temperature=1e-320))
    assert tiny.output_ids == engine.generate("the lazy dog", GREEDY).output_ids
    reply = post(server, chat_body(temperature=1e-320))
    assert reply.status_code == 200
    assert_still_serving(server, chat_package)


@pytest.mark.parametrize("body, message", [
    ('{"model": "tiny-chat", "messages": [{"role": "user", "content": "\\ud800 fox"}]}', "not valid Unicode"),
    ('{"model": "tiny-chat", "prompt": "\\udfff"}', "not valid Unicode"),
    (json.dumps(chat_body(messages=[{"role": "wizard", "content": "hi"}])), "has role 'wizard'"),
    (json.dumps(chat_body(temperature=10**400)), "'temperature' is too large"),
    ('{"model": "tiny-chat", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "not valid JSON"),
])
def test_bad_text_and_fields_are_refused_with_400(server, chat_package, body, message):
    path = "/v1/completions" if '"prompt"' in body else "/v1/chat/completions"
    reply = post(server, body, path)
    assert reply.status_code == 400 and message in reply.json()["error"]["message"], reply.text
    assert_still_serving(server, chat_package)


def test_a_prompt_that_is_not_utf8_on_the_command_line(chat_package):
    clean_failure(llmc_cli("run", chat_package, b"caf\xe9 \xff", "--raw", timeout=60), "not valid Unicode")


def test_run_refuses_what_the_server_refuses_at_the_context_length(chat_package):
    clean_failure(llmc_cli("run", chat_package, "the dog", "--raw", "-n", "300", timeout=60),
                  "maximum context length is 256 tokens")


# -- faults stay with their request; a dead engine says so ------------------------------------------------------
def test_a_failing_sampler_fails_only_its_request(server, chat_package, monkeypatch):
    sample = Sampler.sample

    def faulty(self, logits, history, allowed=None):
        if self.params.seed == 666:
            raise FloatingPointError("injected sampling fault")
        return sample(self, logits, history, allowed)
    monkeypatch.setattr(Sampler, "sample", faulty)
    bad = chat_body(temperature=0.7, seed=666)
    with ThreadPoolExecutor(4) as pool:
        good = [pool.submit(post, server, chat_body()) for _ in range(3)]
        failed = post(server, bad)
        assert all(g.result().status_code == 200 for g in good)
    assert failed.status_code == 500 and "injected sampling fault" in failed.json()["error"]["message"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**bad, "stream": True}, timeout=30) as reply:
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "injected sampling fault" in json.loads(events[-2])["error"]["message"]
    assert_still_serving(server, chat_package)


class EngineCrash(BaseException):
    """A fault the worker thread cannot survive."""


def test_an_engine_that_dies_ends_every_request_at_once_and_says_so(chat_package, monkeypatch):
    with ServerThread(chat_package, CACHE) as server:
        def crash():
            raise EngineCrash("injected")
        monkeypatch.setattr(server.engine.scheduler, "step", crash)
        monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the worker's death is expected here
        started = time.monotonic()
        first = post(server, chat_body())
        assert first.status_code == 503 and "engine has stopped" in first.json()["error"]["message"]
        assert post(server, chat_body()).status_code == 503
        assert time.monotonic() - started < 10
        assert httpx.get(server.url + "/health").status_code == 503
        assert len(server.stopped) == 1


def test_serve_exits_with_an_error_when_the_engine_dies(chat_package, monkeypatch):
    from llmc.runtime.async_engine import AsyncEngine
    from llmc.runtime.server import serve

    def crash(self):
        raise EngineCrash("injected")
    monkeypatch.setattr(AsyncEngine, "_run_steps", crash)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)
    with pytest.raises(llmc.LlmcError, match="the engine stopped .*EngineCrash"):
        serve(llmc.load(chat_package, cache=CACHE), MODEL, "127.0.0.1", 0)


# -- server limits -------------------------------------------------------------------------------------------------
def test_an_oversized_body_gets_413(server, chat_package):
    reply = post(server, chat_body(messages=[{"role": "user", "content": "fox " * 600_000}]))
    assert reply.status_code == 413 and "at most 1048576" in reply.json()["error"]["message"]
    assert_still_serving(server, chat_package)


def test_a_body_shorter_than_its_content_length_times_out(server, chat_package):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n{\"model\": ")
        started = time.monotonic()
        answer = raw.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 408") and time.monotonic() - started < 5
    assert_still_serving(server, chat_package)


def test_a_long_prompt_does_not_block_other_clients(chat_package):
    with ServerThread(chat_package, CACHE, ServerLimits(max_body_bytes=16 * 2**20)) as server:
        long_prompt = " ".join(CHAT_WORDS) * 30_000  # about 2.5 MB of text to tokenize
        pending = ThreadPoolExecutor(1).submit(post, server, {"model": MODEL, "prompt": long_prompt, "max_tokens": 1},
                                               "/v1/completions")
        time.sleep(0.3)
        started = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        assert time.monotonic() - started < 0.5
        assert pending.result().status_code == 400  # longer than the context, found once tokenized


def _stream_events(url: str, body: dict, opened: threading.Barrier | None = None) -> list[str]:
    """The data of every server-sent event of one streamed request (waiting at `opened` after the first)."""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as reply:
        events = []
        for line in reply.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 1 and opened is not None:
                    opened.wait(timeout=60)
    return events


def test_sigterm_with_eight_open_streams(chat_package):
    port = free_port()
    process, url = start_server([sys.executable, "-m", "llmc.cli", "serve", chat_package, "--port", str(port),
                                 "--model-name", MODEL, "--max-batch", "8", "--kv-tokens", "2048", "--threads", "1",
                                 "--shutdown-timeout", "2"], port)
    opened = threading.Barrier(9)
    body = chat_body(max_tokens=200, ignore_eos=True, stream=True)
    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(_stream_events, url, body, opened) for _ in range(8)]
        opened.wait(timeout=60)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal, so the exit status says SIGTERM
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        stopped = time.monotonic() - started
        endings = [future.result() for future in streams]
    assert stopped < 2 + 3, f"the server took {stopped:.1f} s to stop"
    assert all(events[-1] == "[DONE]" for events in endings)


def test_streams_open_at_the_shutdown_deadline_end_with_an_error_event(chat_package, monkeypatch):
    with ServerThread(chat_package, CACHE) as server:
        model, step = server.engine.engine.model, server.engine.engine.model.step
        monkeypatch.setattr(model, "step", lambda *args, **kwargs: (time.sleep(0.02), step(*args, **kwargs))[1])
        opened = threading.Barrier(9)
        body = chat_body(max_tokens=200, ignore_eos=True, stream=True)
        with ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(_stream_events, server.url, body, opened) for _ in range(8)]
            opened.wait(timeout=60)
            server.engine.abort_all("the server is shutting down; the request was ended")
            endings = [future.result() for future in streams]
        for events in endings:
            assert events[-1] == "[DONE]" and "shutting down" in json.loads(events[-2])["error"]["message"]
        assert server.pages_in_use_without_the_prefix_cache() == 0


# -- packages ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A Hugging Face model folder: a tiny Llama with the chat tokenizer."""
    folder = tmp_path_factory.mktemp("checkpoint") / "tiny-llama"
    build_tiny("llama_gqa_untied").save_pretrained(folder)
    save_chat_tokenizer(folder)
    return folder


def test_kill_9_at_ten_points_of_a_recompile_leaves_the_package_working(model_folder, tmp_path):
    package = tmp_path / "pkg"
    started = time.monotonic()
    first = llmc_cli("compile", str(model_folder), "-o", str(package), "--verbose")
    duration = time.monotonic() - started
    assert first.returncode == 0
    # --verbose names the rewrite rules that fired in each function: here, one paged attention per layer.
    assert b"llmc.passes: forward: paged_attention x2" in first.stderr
    expected = llmc.load(package).generate([1, 2, 3], GREEDY).output_ids
    for point in range(10):
        compile_again = subprocess.Popen([sys.executable, "-m", "llmc.cli", "compile", str(model_folder), "-o",
                                          str(package)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
        time.sleep(duration * (point + 0.5) / 10)
        compile_again.kill()
        compile_again.wait()
        assert llmc.load(package).generate([1, 2, 3], GREEDY).output_ids == expected, f"killed at point {point}"
    assert llmc_cli("compile", str(model_folder), "-o", str(package)).returncode == 0
    assert not list(tmp_path.glob(".pkg.partial-*"))  # the next compile clears what the killed ones left


def test_a_package_without_its_metadata_is_called_incomplete(tiny_package, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_package("llama_mha_tied"), copy)
    (copy / METADATA_FILE).unlink()
    clean_failure(llmc_cli("run", str(copy), "hello", timeout=60), "is an incomplete llmc package")
    with pytest.raises(PackageError, match="incomplete llmc package"):
        llmc.load(copy)


def test_a_library_for_a_newer_processor_is_refused_naming_what_this_one_lacks(tiny_package, tmp_path, monkeypatch):
    # A processor as old as the first x86-64 ones: every package compiled by llmc uses more.
    older = tmp_path / "cpuinfo"
    older.write_text("processor\t: 0\nflags\t\t: fpu cx8 cmov sse sse2\n")
    monkeypatch.setattr("llmc.runtime.cpu_features.CPUINFO", older)
    with pytest.raises(PackageError, match=r"compiled for a \S+ processor, and its cpu library uses .*avx2.*"
                                           r"which this processor lacks.*LLMC_CPU"):
        llmc.load(tiny_package("llama_mha_tied"))


def test_llmc_cpu_compiles_for_an_older_processor_with_the_same_tokens(tiny_model, tiny_package, model_folder,
                                                                        tmp_path, monkeypatch):
    from llmc.compiler import compile_model

    with monkeypatch.context() as patch:
        patch.setenv("LLMC_CPU", "haswell")
        package = compile_model(tiny_model("llama_mha_tied"), tmp_path / "pkg")
    target = json.loads((package / METADATA_FILE).read_text())["targets"]["cpu"]
    assert target["mcpu"] == "haswell" and "avx2" in target["cpu_features"]
    assert not any(feature.startswith("avx512") for feature in target["cpu_features"])
    expected = llmc.load(tiny_package("llama_mha_tied")).generate([1, 2, 3], GREEDY).output_ids
    assert llmc.load(package).generate([1, 2, 3], GREEDY).output_ids == expected
    clean_failure(llmc_cli("compile", str(model_folder), "-o", str(tmp_path / "other"),
                           env={**os.environ, "LLMC_CPU": "pentium-9000"}),
                  "LLMC_CPU='pentium-9000' is not a CPU that LLVM knows")


@pytest.mark.parametrize("output, message", [("file", "is a file; give a folder"),
                                             ("/proc/llmc-package", "cannot write the package into /proc"),
                                             ("busy", "holds files that are not an llmc package")])
def test_an_output_that_cannot_take_a_package_is_refused_before_compiling(model_folder, tmp_path, output, message):
    target = tmp_path / output if not output.startswith("/") else Path(output)
    if output == "file":
        target.write_text("not a folder")
    if output == "busy":
        target.mkdir()
        (target / "notes.txt").write_text("keep me")
    started = time.monotonic()
    clean_failure(llmc_cli("compile", str(model_folder), "-o", str(target), timeout=120), message)
    assert time.monotonic() - started < 15  # before loading the model (torch's import alone takes seconds)
    if output == "busy":
        assert (target / "notes.txt").read_text() == "keep me"


def test_a_broken_cache_entry_is_compiled_again_and_first_uses_wait_for_one_compile(model_folder, tmp_path):
    env = {**os.environ, "LLMC_CACHE_DIR": str(tmp_path / "cache")}

    def run() -> subprocess.CompletedProcess:
        return llmc_cli("run", str(model_folder), "--raw", "the lazy dog", "--json", "-n", "6", env=env)
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: run(), range(2))
    assert first.returncode == 0 and second.returncode == 0
    assert first.stdout == second.stdout
    assert (first.stderr + second.stderr).count(b"first use only") == 1
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    weights = entry / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 3] ^= 0x01
    weights.write_bytes(bytes(data))
    again = run()
    assert again.returncode == 0 and again.stdout == first.stdout
    assert b"the cached package cannot be used" in again.stderr


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_a_checkpoint_must_supply_every_parameter(model_folder, tmp_path, damage):
    folder = tmp_path / "damaged"
    shutil.copytree(model_folder, folder)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    if damage == "missing":
        del tensors[name]
    elif damage == "extra":
        tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(4, 4)
    else:
        tensors[name] = torch.zeros(8, 64)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    expected = {"missing": f"it lacks {name}", "extra": "does not use: model.layers.9.mlp.up_proj.weight",
                "shape": f"{name} has shape [8, 64], the model needs [32, 64]"}[damage]
    clean_failure(llmc_cli("compile", str(folder), "-o", str(tmp_path / "out"), timeout=300), expected)
    assert not (tmp_path / "out").exists()


def test_a_model_without_attention_is_refused_without_advice_llmc_cannot_follow(tmp_path):
    import transformers

    config = transformers.MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, state_size=4)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mamba")
    result = llmc_cli("compile", str(tmp_path / "mamba"), "-o", str(tmp_path / "out"), timeout=300)
    clean_failure(result, "is a MambaForCausalLM, which llmc cannot compile")
    assert b"attn_implementation" not in result.stderr


def test_every_file_of_a_package_is_checked_for_truncation_and_flipped_bytes(chat_package, tmp_path):
    files = [METADATA_FILE, *Package.open(chat_package).metadata["files"]]
    rng = np.random.default_rng(0)
    for name in files:
        size = (Path(chat_package) / name).stat().st_size
        damages = [("truncated", size // 2)] + [("flipped", int(i)) for i in rng.integers(0, size, 3)]
        for kind, where in damages:
            copy = tmp_path / f"{name}-{kind}-{where}"
            shutil.copytree(chat_package, copy)
            data = bytearray((copy / name).read_bytes())
            if kind == "truncated":
                del data[where:]
            else:
                data[where] ^= 0x20
            (copy / name).write_bytes(bytes(data))
            with pytest.raises(PackageError):
                load_ir(str(copy)) if name == GRAPH_FILE else llmc.load(copy)  # only `inspect` reads the graph
            shutil.rmtree(copy)


# -- the fuzzer ---------------------------------------------------------------------------------------------------
VALUES = [None, True, -1, 0, 1, 3, 2**31, 2**70, -1e308, 0.5, 1e-320, 7.5, "", "x", "\u202e\U0001F600\x00", [], [1],
          ["a"], {}, {"a": 1}, "fox " * 2000]
FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
          "n", "logprobs", "stream_options", "repetition_penalty", "ignore_eos", "max_completion_tokens", "user"]


def _mutated(rng: np.random.Generator) -> tuple[str, str]:
    chat = bool(rng.integers(2))
    body: dict = ({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "the dog"}]} if chat else
                  {"model": MODEL, "max_tokens": 4, "prompt": "the dog"})
    for _ in range(int(rng.integers(1, 4))):
        action = int(rng.integers(5))
        field = FIELDS[int(rng.integers(len(FIELDS)))]
        if action == 0:
            body.pop(field, None)
        elif action <= 2:
            body[field] = VALUES[int(rng.integers(len(VALUES)))]
        elif action == 3 and chat:
            body["messages"] = [{"role": VALUES[int(rng.integers(len(VALUES)))], "content": "hi"},
                                {"role": "user", "content": VALUES[int(rng.integers(len(VALUES)))]}]
        else:
            body["max_tokens"] = int(rng.integers(-2, 40))
    text = json.dumps(body)
    if rng.integers(10) == 0:  # what JSON forbids and Python's parser takes, or a cut-off body
        text = [text.replace("4", "NaN", 1), text[: int(rng.integers(len(text)))], text + "}"][int(rng.integers(3))]
    return ("/v1/chat/completions" if chat else "/v1/completions"), text


def test_two_thousand_mutated_requests(server, chat_package):
    rng = np.random.default_rng(2026)
    cases = [_mutated(rng) for _ in range(2000)]

    def send(case: tuple[str, str]) -> tuple[int, str]:
        path, text = case
        streamed = '"stream": true' in text
        # The body as sent: JSON strings may hold U+0085 or U+2028 unescaped, where iter_lines would split them.
        with httpx.stream("POST", server.url + path, content=text, headers={"content-type": "application/json"},
                          timeout=30) as reply:
            body = reply.read().decode()
        if reply.status_code == 200:
            if streamed:
                assert body.rstrip().endswith("data: [DONE]"), (text, body[-300:])
            else:
                assert json.loads(body)["choices"], (text, body)
        return reply.status_code, text
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, cases))
    server_errors = [(status, text) for status, text in answers if status >= 500]
    assert not server_errors, server_errors[:5]
    assert sum(status == 200 for status, _ in answers) > 200  # the mutations leave many requests valid
    assert server.engine.alive
    assert_still_serving(server, chat_package)
