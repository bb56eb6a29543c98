"""Generation engines: the continuous engine against the reference, log-probs, bad choices."""

from __future__ import annotations

import json
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import cpu_launch_config, free_port
from spinflow import engines
from spinflow.chat import prompt_ids
from spinflow.config import GenerateParams
from spinflow.engines.continuous import TOLERANCE, ContinuousEngine, _probe
from spinflow.errors import SpinflowError
from spinflow.generation import Request, SamplingParams, TorchEngine

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# prompts of clearly different lengths, so slots refill at different steps
PROMPTS = [" ".join(["word"] * (1 + 3 * i)) + f" number {i}?" for i in range(10)]
SETTINGS = [
    SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=10),
    SamplingParams(temperature=0.0, max_new_tokens=10),
    SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=12),
]


def _requests(tokenizer, seed: int = 3) -> list[Request]:
    return [Request(prompt_ids(tokenizer, p, None, 128), seed + i) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def eos(tiny_model_session, tiny_tokenizer_session) -> int:
    """An end token the untrained tiny model often samples (its own eos it hardly ever does),
    so that rows end at different steps and slots refill while others decode."""
    tok = tiny_tokenizer_session
    engine = TorchEngine(
        tiny_model_session,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        batch_size=10,
    )
    counts: dict[int, int] = {}
    for setting in SETTINGS:
        if setting.temperature == 0.0:
            continue  # greedy repeats one token: it would end every answer at once
        for completion in engine.complete(_requests(tok), setting):
            for token in set(completion.token_ids):
                counts[token] = counts.get(token, 0) + 1
    return max(sorted(counts), key=counts.get)


@pytest.fixture(scope="module")
def reference(tiny_model_session, tiny_tokenizer_session, eos):
    engine = TorchEngine(
        tiny_model_session,
        eos_token_id=eos,
        pad_token_id=tiny_tokenizer_session.pad_token_id,
        batch_size=4,
    )
    return [engine.complete(_requests(tiny_tokenizer_session), s) for s in SETTINGS]


@pytest.mark.parametrize("slots", [1, 3, 16])
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_continuous_engine_answers_as_the_reference(
    tiny_model_session, tiny_tokenizer_session, reference, eos, slots, setting
):
    engine = ContinuousEngine(tiny_model_session, eos_token_id=eos, batch_size=slots)
    got = engine.complete(_requests(tiny_tokenizer_session), SETTINGS[setting])
    expected = reference[setting]
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert [c.ended for c in got] == [c.ended for c in expected]
    assert [c.logp for c in got] == pytest.approx([c.logp for c in expected], abs=1e-4)


def test_reference_answers_vary_in_length(reference):
    """The comparison above means something only if rows end at different steps."""
    for setting, completions in zip(SETTINGS, reference, strict=True):
        if setting.temperature > 0:
            assert len({len(c.token_ids) for c in completions}) >= 3
            assert any(c.ended for c in completions) and not all(c.ended for c in completions)


def test_logp_is_the_models_log_prob_of_answer_and_end_token(
    tiny_model_session, tiny_tokenizer_session, eos
):
    """Recorded log-probs equal a plain forward pass over prompt + answer (+ end token)."""
    tok = tiny_tokenizer_session
    engine = ContinuousEngine(tiny_model_session, eos_token_id=eos, batch_size=4)
    requests = _requests(tok)
    completions = engine.complete(requests, SamplingParams(temperature=1.0, max_new_tokens=10))
    for request, completion in zip(requests, completions, strict=True):
        answer = completion.token_ids + ([eos] if completion.ended else [])
        ids = torch.tensor([request.prompt_ids + answer])
        with torch.no_grad():
            logits = tiny_model_session(input_ids=ids).logits[0].float()
        start = len(request.prompt_ids)
        logps = torch.log_softmax(logits[start - 1 : -1], -1)
        expected = logps.gather(1, torch.tensor(answer).unsqueeze(1)).sum().item()
        assert completion.logp == pytest.approx(expected, abs=1e-4)


def test_bfloat16_engine_stays_close_to_float32(tiny_model_session, tiny_tokenizer_session):
    """bfloat16 weights: greedy answers' log-probs under float32 within 0.05 a token."""
    tok = tiny_tokenizer_session
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    requests = _requests(tok)
    fp32 = ContinuousEngine(tiny_model_session, eos_token_id=tok.eos_token_id, batch_size=4)
    bf16 = ContinuousEngine(
        tiny_model_session, eos_token_id=tok.eos_token_id, batch_size=4, dtype="bfloat16"
    )
    assert next(tiny_model_session.parameters()).dtype == torch.float32  # a copy was cast
    full, low = fp32.complete(requests, greedy), bf16.complete(requests, greedy)
    agree = [a for a, b in zip(full, low, strict=True) if a.token_ids == b.token_ids]
    assert len(agree) >= 7
    for a, b in zip(full, low, strict=True):
        if a.token_ids == b.token_ids:
            tokens = len(a.token_ids) + a.ended
            assert abs(a.logp - b.logp) <= 0.05 * tokens


def test_open_engine_builds_the_named_engine(tiny_model_session, tiny_tokenizer_session, tmp_path):
    for name, kind in (("torch", TorchEngine), ("continuous", ContinuousEngine)):
        g = GenerateParams(engine=name, batch_size=5)
        engine = engines.open_engine(
            g, tiny_model_session, tiny_tokenizer_session, model_dir=tmp_path, batch_size=2
        )
        assert isinstance(engine, kind) and engine.name == name


def test_unknown_engine_is_one_line_naming_the_key():
    with pytest.raises(SpinflowError, match=r"^generate\.engine: unknown engine 'fast'; choose"):
        engines.check_engine("fast")


def test_vllm_missing_is_one_line_saying_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # find_spec then reports it missing
    real_find_spec = engines.importlib.util.find_spec
    monkeypatch.setattr(
        engines.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a),
    )
    with pytest.raises(SpinflowError) as err:
        engines.check_engine("vllm")
    message = str(err.value)
    assert message.startswith("generate.engine: vllm is not installed")
    assert "spinflow[vllm]" in message and "\n" not in message


def test_vllm_without_gpu_is_one_line(monkeypatch):
    real_find_spec = engines.importlib.util.find_spec
    monkeypatch.setattr(
        engines.importlib.util,
        "find_spec",
        lambda name, *a: SimpleNamespace() if name == "vllm" else real_find_spec(name, *a),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SpinflowError, match=r"^generate\.engine: vllm needs a CUDA GPU"):
        engines.check_engine("vllm")


def test_continuous_engine_refuses_other_architectures(tiny_model_session):
    other = SimpleNamespace(config=SimpleNamespace(model_type="gpt2"))
    with pytest.raises(SpinflowError, match=r"^generate\.engine: continuous supports llama"):
        ContinuousEngine(other, eos_token_id=0, batch_size=2)


def test_generate_stage_in_two_processes_writes_the_one_process_file(tiny_dvc_repo, tmp_path):
    """The pool sharded over 2 CPU processes (accelerate launch, gloo) gives the bytes that
    `dvc repro` wrote with one process."""
    repo = tiny_dvc_repo.copy(tmp_path / "repo")
    generated = repo.root / "generated" / "iter_0"
    expected = {p.name: p.read_bytes() for p in generated.iterdir()}
    config = cpu_launch_config(tmp_path / "two_cpu_processes.yaml", free_port())
    shutil.rmtree(generated)
    output = repo.run(
        "accelerate",
        "launch",
        "--config_file",
        str(config),
        "stages/generate.py",
        "generate_iter_0",
    )
    assert "'processes': 2" in output
    got = {p.name: p.read_bytes() for p in generated.iterdir()}
    assert got.keys() == expected.keys()
    assert got["provenance.json"] == expected["provenance.json"]
    # answers byte-identical; log-probs to float tolerance (other rows in the batch change the
    # summation order inside the matrix kernels)
    rows = [json.loads(line) for line in got["pairs.jsonl"].splitlines()]
    reference = [json.loads(line) for line in expected["pairs.jsonl"].splitlines()]
    assert [r["generated_logp"] for r in rows] == pytest.approx(
        [r["generated_logp"] for r in reference], abs=1e-3
    )
    for row in rows + reference:
        row.pop("generated_logp")
    assert rows == reference
    assert sorted(p.name for p in generated.parent.iterdir()) == sorted(
        p.name for p in (tiny_dvc_repo.root / "generated").iterdir()
    )


# ---------------------------------------------------------------------------------------------
# generate.dtype: auto


def _auto(model, tokenizer, monkeypatch, tmp_path, *, native=True, **constants):
    from spinflow import precision
    from spinflow.engines import continuous

    monkeypatch.setenv("SPINFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precision, "native_bf16", lambda device: (native, "mocked capability"))
    for name, value in constants.items():
        monkeypatch.setattr(continuous, name, value)
    prompts = [r.prompt_ids for r in _requests(tokenizer)]
    return continuous.choose_dtype(model, prompts, 4, eos_token_id=tokenizer.eos_token_id)


def test_auto_dtype_is_float32_without_native_bfloat16(
    tiny_model_session, tiny_tokenizer_session, monkeypatch, tmp_path
):
    dtype, reason = _auto(
        tiny_model_session, tiny_tokenizer_session, monkeypatch, tmp_path, native=False
    )
    assert dtype == "float32" and "not native" in reason
    assert not list(tmp_path.rglob("*.json"))  # nothing measured, nothing cached


def test_auto_dtype_rejects_bfloat16_beyond_tolerance_or_margin(
    tiny_model_session, tiny_tokenizer_session, monkeypatch, tmp_path
):
    dtype, reason = _auto(
        tiny_model_session, tiny_tokenizer_session, monkeypatch, tmp_path / "a", TOLERANCE=0.0
    )
    assert dtype == "float32" and "differ by" in reason
    dtype, reason = _auto(
        tiny_model_session,
        tiny_tokenizer_session,
        monkeypatch,
        tmp_path / "b",
        SPEED_MARGIN=float("inf"),
        TOLERANCE=10.0,
    )
    assert dtype == "float32" and "as fast, under" in reason


def test_auto_dtype_is_measured_once_then_cached(
    tiny_model_session, tiny_tokenizer_session, monkeypatch, tmp_path
):
    first, _ = _auto(
        tiny_model_session,
        tiny_tokenizer_session,
        monkeypatch,
        tmp_path,
        SPEED_MARGIN=0.0,
        TOLERANCE=10.0,
    )
    assert first == "bfloat16"
    (record,) = tmp_path.rglob("*.json")
    assert json.loads(record.read_text())["dtype"] == "bfloat16"
    # the cached choice holds even where a new probe would now reject bfloat16
    from spinflow.engines import continuous

    monkeypatch.setattr(continuous, "_probe", lambda *a: pytest.fail("measured again"))
    again, reason = continuous.choose_dtype(
        tiny_model_session,
        [r.prompt_ids for r in _requests(tiny_tokenizer_session)],
        4,
        eos_token_id=tiny_tokenizer_session.eos_token_id,
    )
    assert again == "bfloat16" and "cached" in reason


def test_auto_engine_resolves_on_its_first_prompts(
    tiny_model_session, tiny_tokenizer_session, monkeypatch, tmp_path, eos
):
    from spinflow import precision

    monkeypatch.setenv("SPINFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precision, "native_bf16", lambda device: (False, "mocked"))
    engine = ContinuousEngine(tiny_model_session, eos_token_id=eos, batch_size=4, dtype="auto")
    got = engine.complete(_requests(tiny_tokenizer_session), SETTINGS[0])
    assert engine.dtype == torch.float32 and len(got) == len(PROMPTS)


SYSTEM = "You are a careful assistant. Answer briefly, exactly, and in plain words."


@pytest.mark.parametrize("setting", [0, 2])
def test_shared_prompt_prefix_is_computed_once_with_the_same_answers(
    tiny_model_session, tiny_tokenizer_session, eos, monkeypatch, setting
):
    """Prompts under one system prompt share a prefix: its keys and values are computed once
    and copied into each slot, and the answers stay the reference's."""
    tok = tiny_tokenizer_session
    requests = [Request(prompt_ids(tok, p, SYSTEM, 256), 3 + i) for i, p in enumerate(PROMPTS)]
    reference = TorchEngine(
        tiny_model_session, eos_token_id=eos, pad_token_id=tok.pad_token_id, batch_size=4
    ).complete(requests, SETTINGS[setting])
    engine = ContinuousEngine(tiny_model_session, eos_token_id=eos, batch_size=3)
    shared = []
    original = engine._shared_prefix
    monkeypatch.setattr(engine, "_shared_prefix", lambda r: shared.append(original(r)) or shared[0])
    got = engine.complete(requests, SETTINGS[setting])
    assert shared and shared[0] >= 8
    assert [c.token_ids for c in got] == [c.token_ids for c in reference]
    assert [c.logp for c in got] == pytest.approx([c.logp for c in reference], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# The vllm engine's adapter, against a stand-in for vLLM's offline API (no GPU here): what it
# sends per request, how it reads the outputs, and how replicas split and reassemble requests.

FAKE_VLLM = """
import os
from types import SimpleNamespace

class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

class LLM:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def generate(self, prompts, params, use_tqdm=True):
        outputs = []
        for prompt, p in zip(prompts, params):
            ids = prompt["prompt_token_ids"]
            # answer: the seed, the replica's GPUs as a number, then the end token if seed is even
            tokens = [p.seed, int(os.environ["CUDA_VISIBLE_DEVICES"].replace(",", ""))]
            ended = p.seed % 2 == 0
            if ended:
                tokens.append(p.stop_token_ids[0])
            logprobs = [{t: SimpleNamespace(logprob=-0.5)} for t in tokens]
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(
                token_ids=tokens, logprobs=logprobs, finish_reason="stop" if ended else "length",
            )], prompt_token_ids=ids, params=p))
        return outputs
"""


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    (tmp_path / "vllm.py").write_text(FAKE_VLLM)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    yield
    sys.modules.pop("vllm", None)


@pytest.mark.parametrize("replicas", [1, 2])
def test_vllm_engine_sends_each_seed_and_reassembles_replicas(
    fake_vllm, monkeypatch, tmp_path, replicas
):
    from spinflow.config import VllmParams
    from spinflow.engines.vllm import VllmEngine

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,7")
    options = VllmParams(data_parallel_size=replicas)
    engine = VllmEngine(tmp_path, eos_token_id=99, options=options)
    requests = [Request([1, 2, i], seed=10 + i) for i in range(5)]
    got = engine.complete(requests, SamplingParams(temperature=1.0, max_new_tokens=8))
    gpus = ["3", "7"] if replicas == 2 else ["37"]
    for i, completion in enumerate(got):
        seed = 10 + i
        assert completion.token_ids == [seed, int(gpus[i % replicas])]  # end token stripped
        assert completion.ended == (seed % 2 == 0)
        assert completion.logp == pytest.approx(-0.5 * (2 + completion.ended))


def test_vllm_engine_needs_enough_gpus_for_its_replicas(fake_vllm, monkeypatch, tmp_path):
    from spinflow.config import VllmParams
    from spinflow.engines.vllm import VllmEngine

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    options = VllmParams(data_parallel_size=2, tensor_parallel_size=2)
    engine = VllmEngine(tmp_path, eos_token_id=99, options=options)
    with pytest.raises(SpinflowError, match=r"^generate\.vllm: .* needs 4 GPUs, 1 visible$"):
        engine.complete([Request([1], 0)], SamplingParams(max_new_tokens=2))


def _tiny_architecture(kind: str):
    """A small random model of another supported architecture: qwen2 has biases on q, k and v,
    qwen3 per-head norms before the rotary embedding, mistral a sliding window."""
    import transformers

    shape = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    config = {
        "qwen2": lambda: transformers.Qwen2Config(**shape),
        "qwen3": lambda: transformers.Qwen3Config(head_dim=16, **shape),
        "mistral": lambda: transformers.MistralConfig(sliding_window=6, **shape),
    }[kind]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # biases and norm weights away from their zero and one defaults
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model.eval()


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_continuous_engine_answers_as_the_reference_on_other_architectures(kind):
    model = _tiny_architecture(kind)
    requests = [Request([4 + (i + 7 * j) % 90 for j in range(2 + 3 * i)], 11 + i) for i in range(6)]
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12)
    # the end token: the one the model samples most, so that answers end at different steps
    sampled = TorchEngine(model, eos_token_id=-1, pad_token_id=0, batch_size=6)
    tokens = [t for c in sampled.complete(requests, sampling) for t in c.token_ids]
    eos = max(sorted(set(tokens)), key=tokens.count)
    reference = TorchEngine(model, eos_token_id=eos, pad_token_id=0, batch_size=6)
    expected = reference.complete(requests, sampling)
    got = ContinuousEngine(model, eos_token_id=eos, batch_size=4).complete(requests, sampling)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert [c.logp for c in got] == pytest.approx([c.logp for c in expected], abs=1e-4)
    # the answers grow past the sliding window and end at different steps
    assert len({len(c.token_ids) for c in expected}) >= 2
    longest = max(
        len(r.prompt_ids) + len(c.token_ids) for r, c in zip(requests, expected, strict=True)
    )
    assert longest > 6
    # bfloat16 (packed weights where oneDNN has them) teacher-forced on float32's answers
    probe = _probe(model, [r.prompt_ids for r in requests], 4, eos)
    assert probe["answer_tokens"] > 30
    assert probe["logp_difference"] <= TOLERANCE / 10  # 4e-4 to 5e-4 on these models
