"""Generation engines: the continuous engine against the reference, log-probs, bad choices."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import cpu_launch_config, free_port
from spinflow import engines
from spinflow.chat import prompt_ids
from spinflow.config import GenerateParams, VllmParams
from spinflow.engines.continuous import TOLERANCE, ContinuousEngine, _probe
from spinflow.engines.torch import TorchEngine
from spinflow.errors import SpinflowError
from spinflow.generation import Request, SamplingParams

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
# The vllm engine against tests/vllm_double, a double of vLLM 0.33's offline API (no GPU here):
# the arguments it sends, one model per process reused across calls and released, replicas, the
# dtype handed to vLLM, and the end tokens.

VLLM_DOUBLE = Path(__file__).parent / "vllm_double"


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def vllm_double(tmp_path, monkeypatch):
    """``import vllm`` finds the double, a GPU is "visible", and the double's events go to
    the returned file."""
    from spinflow.engines import vllm as adapter

    log = tmp_path / "vllm_events.jsonl"
    monkeypatch.syspath_prepend(str(VLLM_DOUBLE))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setenv("VLLM_DOUBLE_LOG", str(log))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    yield log
    if adapter._resident is not None:
        adapter._resident.close()
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        sys.modules.pop(name)


def _vllm_generate(**vllm):
    return GenerateParams(engine="vllm", vllm=VllmParams(**vllm))


def _vllm_requests(tokenizer, count: int = 6) -> list[Request]:
    return _requests(tokenizer)[:count]


def test_the_double_refuses_what_vllm_refuses(vllm_double, tiny_checkpoint):
    import vllm

    assert vllm.__version__ == "0.33.0"
    with pytest.raises(TypeError, match="max_new_tokens"):
        vllm.SamplingParams(max_new_tokens=4)  # spinflow's name, not vLLM's
    with pytest.raises(TypeError, match="max_tokens"):
        vllm.SamplingParams(max_tokens="4")
    for bad in ({"temperature": 2.5}, {"temperature": -1.0}, {"top_p": 0.0}, {"max_tokens": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            vllm.SamplingParams(**bad)
    with pytest.raises(TypeError, match="swap_space"):
        vllm.LLM(str(tiny_checkpoint), swap_space=4)  # an argument 0.33 no longer takes
    with pytest.raises(ValueError, match="data_parallel_size"):
        vllm.LLM(str(tiny_checkpoint), data_parallel_size=2)


def test_vllm_engine_loads_one_model_reuses_it_and_releases_it(
    vllm_double, tiny_checkpoint, tiny_tokenizer_session, tmp_path
):
    tok = tiny_tokenizer_session
    requests = _vllm_requests(tok)
    with engines.open_engine(_vllm_generate(), None, tok, model_dir=tiny_checkpoint) as engine:
        first = engine.complete(requests, SETTINGS[0])
        again = engine.complete(requests, SETTINGS[0])
        greedy = engine.complete(requests, SETTINGS[1])
        assert [e["event"] for e in _events(vllm_double)] == ["load"] + ["generate"] * 3
    assert [e["event"] for e in _events(vllm_double)][-2:] == ["shutdown", "cleanup"]
    assert [c.token_ids for c in first] == [c.token_ids for c in again]  # per-request seeds
    assert len(greedy) == len(requests)
    load, generate = _events(vllm_double)[:2]
    assert load["dtype"] == "float32"  # float32 checkpoint, no bfloat16 on this "GPU"
    assert generate["seeds"] == [r.seed for r in requests]
    assert generate["max_tokens"] == [SETTINGS[0].max_new_tokens] * len(requests)
    for completion in first:
        assert 0 < len(completion.token_ids) + completion.ended <= SETTINGS[0].max_new_tokens
        assert completion.logp < 0

    # a process holds one model: loading another releases the one still open first
    other = Path(shutil.copytree(tiny_checkpoint, tmp_path / "other"))
    a = engines.open_engine(_vllm_generate(), None, tok, model_dir=tiny_checkpoint)
    b = engines.open_engine(_vllm_generate(), None, tok, model_dir=other)
    with a, b:
        a.complete(requests[:1], SETTINGS[0])
        b.complete(requests[:1], SETTINGS[0])
    tail = [(e["event"], Path(e.get("model", "")).name) for e in _events(vllm_double)][-8:]
    assert tail == [
        ("load", "tiny-model"),
        ("generate", "tiny-model"),
        ("shutdown", "tiny-model"),
        ("cleanup", ""),
        ("load", "other"),
        ("generate", "other"),
        ("shutdown", "other"),
        ("cleanup", ""),
    ]


def test_vllm_replicas_keep_their_model_and_answer_as_one_process(
    vllm_double, tiny_checkpoint, tiny_tokenizer_session, monkeypatch
):
    """Two replicas, each a process on its own GPU: every other request each, one model load
    each for two calls, the answers those of one process, and both released on close."""
    tok = tiny_tokenizer_session
    requests = _vllm_requests(tok)
    with engines.open_engine(_vllm_generate(), None, tok, model_dir=tiny_checkpoint) as engine:
        expected = engine.complete(requests, SETTINGS[0])
    vllm_double.unlink()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,7")
    generate = _vllm_generate(data_parallel_size=2)
    with engines.open_engine(generate, None, tok, model_dir=tiny_checkpoint) as engine:
        got = engine.complete(requests, SETTINGS[0])
        again = engine.complete(requests[:3], SETTINGS[0])
        processes = [process for process, _ in engine._workers]
    assert not any(process.is_alive() for process in processes)
    assert [(c.token_ids, c.logp, c.ended) for c in got] == [
        (c.token_ids, c.logp, c.ended) for c in expected
    ]
    assert [c.token_ids for c in again] == [c.token_ids for c in expected[:3]]
    events = _events(vllm_double)
    by_devices = {
        devices: [e["event"] for e in events if e["devices"] == devices] for devices in ("3", "7")
    }
    assert by_devices == {d: ["load", "generate", "generate", "shutdown", "cleanup"] for d in "37"}
    seeds = [e["seeds"] for e in events if e["event"] == "generate" and e["devices"] == "7"]
    assert seeds[0] == [r.seed for r in requests[1::2]]


def test_vllm_engine_needs_enough_gpus_for_its_replicas(
    vllm_double, monkeypatch, tiny_checkpoint, tiny_tokenizer_session
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    generate = _vllm_generate(data_parallel_size=2, tensor_parallel_size=2)
    engine = engines.open_engine(generate, None, tiny_tokenizer_session, model_dir=tiny_checkpoint)
    with (
        engine,
        pytest.raises(SpinflowError, match=r"^generate\.vllm: .* needs 4 GPUs, 1 visible$"),
    ):
        engine.complete([Request([1], 0)], SamplingParams(max_new_tokens=2))


def test_vllm_dtype_auto_never_hands_vllm_float16(tiny_checkpoint):
    from spinflow.engines.vllm import resolve_dtype

    assert resolve_dtype("auto", tiny_checkpoint, bf16_supported=True)[0] == "bfloat16"
    assert resolve_dtype("auto", tiny_checkpoint, bf16_supported=False)[0] == "float32"
    assert resolve_dtype("float16", tiny_checkpoint, bf16_supported=True)[0] == "float16"
    config = tiny_checkpoint / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "dtype": "bfloat16"}))
    assert resolve_dtype("auto", tiny_checkpoint, bf16_supported=False)[0] == "bfloat16"


def test_theta_trained_with_bf16_on_a_gpu_is_saved_in_bfloat16(
    tiny_model_session, tiny_tokenizer_session, tmp_path, monkeypatch
):
    """On GPUs θk is saved in the precision it was trained in; CPU runs keep float32."""
    from accelerate import Accelerator
    from safetensors import safe_open

    from spinflow import training
    from spinflow.engines.vllm import resolve_dtype

    gpu = SimpleNamespace(mixed_precision="bf16", device=torch.device("cuda", 0))
    cpu = SimpleNamespace(mixed_precision="bf16", device=torch.device("cpu"))
    assert training.saved_dtype(gpu) == torch.bfloat16
    assert training.saved_dtype(cpu) is None
    assert training.saved_dtype(SimpleNamespace(mixed_precision="no", device=gpu.device)) is None

    monkeypatch.setattr(training, "saved_dtype", lambda accelerator: torch.bfloat16)
    out = tmp_path / "theta"
    training.save_checkpoint(Accelerator(cpu=True), tiny_model_session, tiny_tokenizer_session, out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
        assert {weights.get_tensor(name).dtype for name in names} == {torch.bfloat16}
    assert "lm_head.weight" not in names  # tied embeddings stored once
    assert resolve_dtype("auto", out, bf16_supported=False)[0] == "bfloat16"
    assert next(tiny_model_session.parameters()).dtype == torch.float32  # the model is unchanged


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"generate": {"temperature": 2.5}}, "generate.temperature"),
        ({"generate": {"temperature": 0.005}}, "generate.temperature"),
        ({"autoif": {"enabled": True, "temperature": 2.1}}, "autoif.temperature"),
        ({"generate": {"top_p": 0.0}}, "generate.top_p"),
        ({"generate": {"max_new_tokens": 0}}, "generate.max_new_tokens"),
        ({"generate": {"vllm": {"gpu_memory_utilization": 1.2}}}, "generate.vllm.gpu_memory"),
        ({"generate": {"vllm": {"tensor_parallel_size": 0}}}, "generate.vllm.tensor_parallel"),
    ],
)
def test_validate_refuses_what_vllm_would_refuse(changes, key):
    from spinflow.config import validate_params
    from spinflow.errors import ConfigError

    raw = {**changes, "generate": {**changes.get("generate", {}), "engine": "vllm"}}
    with pytest.raises(ConfigError) as err:
        validate_params(raw)
    assert f"'{key}" in str(err.value) and "\n" not in str(err.value)
    if "temperature" in key:  # the other engines take any temperature
        validate_params({**raw, "generate": {**raw["generate"], "engine": "continuous"}})


# ---------------------------------------------------------------------------------------------
# End tokens: every engine stops on the tokenizer's and the generation_config's


@pytest.fixture(scope="module")
def two_end_tokens(tiny_model_session, tiny_tokenizer_session) -> tuple[int, int]:
    """The two tokens the untrained tiny model samples most (its own end token it hardly ever
    samples), so that answers end on each of them."""
    never = TorchEngine(tiny_model_session, eos_token_id=(), pad_token_id=0, batch_size=10)
    counts: dict[int, int] = {}
    for completion in never.complete(_requests(tiny_tokenizer_session), SETTINGS[0]):
        for token in set(completion.token_ids):
            counts[token] = counts.get(token, 0) + 1
    first, second = sorted(counts, key=lambda t: (-counts[t], t))[:2]
    return first, second


def test_every_engine_stops_on_and_strips_the_same_end_tokens(
    tiny_checkpoint, tiny_tokenizer_session, two_end_tokens, vllm_double
):
    from spinflow.generation import end_token_ids
    from spinflow.models import load_model

    tok = tiny_tokenizer_session
    path = tiny_checkpoint / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": two_end_tokens}))
    model = load_model(tiny_checkpoint)
    ends = end_token_ids(tok, model)
    assert ends == (tok.eos_token_id, *two_end_tokens) == end_token_ids(tok, tiny_checkpoint)
    requests = _requests(tok)
    answers = {}
    for name in ("torch", "continuous"):
        with engines.open_engine(
            GenerateParams(engine=name, dtype="float32"), model, tok, model_dir=tiny_checkpoint
        ) as engine:
            answers[name] = engine.complete(requests, SETTINGS[0])
    torch_answers, continuous = answers["torch"], answers["continuous"]
    assert [(c.token_ids, c.end_token_id) for c in continuous] == [
        (c.token_ids, c.end_token_id) for c in torch_answers
    ]
    assert {c.end_token_id for c in torch_answers} >= set(two_end_tokens)  # both ended answers
    for completion in torch_answers:
        assert completion.ended == (completion.end_token_id in ends)
        assert not set(completion.token_ids) & set(ends)  # stripped, and nothing after

    with engines.open_engine(_vllm_generate(), None, tok, model_dir=tiny_checkpoint) as engine:
        from_vllm = engine.complete(requests, SETTINGS[0])
    (sent,) = [e for e in _events(vllm_double) if e["event"] == "generate"]
    assert sent["stop_token_ids"] == [sorted(ends)] * len(requests)
    assert {c.end_token_id for c in from_vllm} - {None} <= set(ends)
    for completion in from_vllm:
        assert completion.ended == (completion.end_token_id is not None)
        assert not set(completion.token_ids) & set(ends)


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
