"""``spinflow doctor``: what this machine can run, checked before a long run starts.

One line a check: ``PASS``, ``FAIL`` or ``SKIP``, its name and why.

- ``device``: each device the stages run their models on (``device`` in params.yaml: every CUDA
  GPU, else the CPU): its name and memory, whether it computes bfloat16 natively
  (:func:`spinflow.precision.native_bf16`), and a float32 matrix product on it compared with
  float64 on the CPU (TF32 or a broken device fails it).
- ``engine``: each generation engine, usable here or why not
  (:func:`spinflow.engines.check_engine`); the one ``generate.engine`` names fails when it is not.
- ``sandbox``: each layer of the sandbox for model-written code, as measured inside a call's
  process (:meth:`spinflow.sandbox.Sandbox.layers`); one call run in it; and whether the layers
  keep that code from the user's files, as AutoIF requires (unless ``autoif.allow_weak_sandbox``).
- ``accelerate``: each accelerate config params.yaml names (``spin.accelerate_config``,
  ``generate.accelerate_config``): it exists, accelerate reads it as ``accelerate launch`` does,
  its processes a machine fit the GPUs here (one a GPU) or the CPU cores, and its machines.
- ``generate`` and ``train``, on each device: a tiny random llama model, built in a temporary
  directory, answers two built-in prompts with :data:`NEW_TOKENS` new tokens through each usable
  engine (``generate.dtype`` and the sampling settings of params.yaml), and the log-prob each
  engine recorded for an answer must equal the training's scoring of the same tokens
  (:func:`spinflow.logprobs.segment_logps`) within :data:`LOGP_TOLERANCE` for float32 engines, or
  :data:`spinflow.engines.continuous.TOLERANCE` a token for bfloat16 ones. Then one SPIN step on
  those answers, through the training loop of the stages, in the precision ``bf16: auto`` (or
  the setting of ``spin.train``) picks there: its loss must be the loss of a policy equal to its
  reference, and it must change the weights.

It imports torch, transformers, accelerate, peft (for LoRA) and spinflow, never DVC or MLflow, so
it runs on a machine where only those are installed. On a CPU it takes a few tens of seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spinflow.config import Params
from spinflow.errors import SpinflowError

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
NEW_TOKENS = 16
PROMPTS = 2
# an answer's summed log-prob, a float32 engine against the training's scoring
# (the agreement tests/test_engines.py asks of the engines against a plain forward pass)
LOGP_TOLERANCE = 1e-4
# the first SPIN step's loss in float32 against the loss at equal policy and reference
LOSS_TOLERANCE = 1e-4
# float32 matrix product against float64, relative: float32 gives about 1e-7, TF32 about 1e-3
PRODUCT_TOLERANCE = 1e-4
PRODUCT_SIZE = 256
# head size 64, which every attention kernel supports (vLLM's included)
TINY_MODEL = {"hidden_size": 128, "num_heads": 2, "intermediate_size": 256}
SANDBOX_PROBE = "def evaluate(response):\n    return response == 'spinflow'\n"


@dataclass(frozen=True)
class Check:
    status: str
    name: str
    reason: str

    def line(self) -> str:
        return f"{self.status}  {self.name}: {self.reason}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, SpinflowError) else f"{type(exc).__name__}: {text}"


@contextlib.contextmanager
def _on(device: torch.device) -> Iterator[None]:
    """``device`` as the current CUDA device (what accelerate's single process uses)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------------
# Devices


def stage_devices(setting: str) -> list[torch.device]:
    """The devices stages run models on with ``device: setting``: every GPU (one a process of a
    launch), or the CPU. A ConfigError where ``cuda`` is asked for and there is none."""
    from spinflow.devices import stage_device

    if stage_device(setting).type == "cpu":
        return [torch.device("cpu")]
    return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]


def _product_error(device: torch.device) -> float:
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(PRODUCT_SIZE, PRODUCT_SIZE, generator=generator) for _ in range(2))
    got = (a.to(device) @ b.to(device)).cpu().double()
    expected = a.double() @ b.double()
    return ((got - expected).norm() / expected.norm()).item()


def _describe_device(device: torch.device) -> str:
    from spinflow.precision import device_identity

    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        return (
            f"{properties.name}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} free), compute "
            f"capability {properties.major}.{properties.minor}, CUDA {torch.version.cuda}"
        )
    identity = device_identity(device)
    return f"{identity['name'] or 'CPU'}, {identity['threads']} torch threads"


def check_device(device: torch.device) -> Check:
    from spinflow.precision import native_bf16

    name = f"device {device}"
    try:
        with _on(device):
            what = _describe_device(device)
            native, evidence = native_bf16(device)
            error = _product_error(device)
    except Exception as exc:
        return Check(FAIL, name, _one_line(exc))
    bf16 = f"native bf16 ({evidence})" if native else f"no native bf16 ({evidence})"
    if not error <= PRODUCT_TOLERANCE:
        return Check(
            FAIL,
            name,
            f"{what}: a float32 matrix product differs from float64's by {error:.1e} (relative), "
            f"more than {PRODUCT_TOLERANCE:.0e}; is TF32 forced on (NVIDIA_TF32_OVERRIDE)?",
        )
    return Check(PASS, name, f"{what}; {bf16}; float32 products within {error:.0e} of float64")


def check_devices(params: Params) -> tuple[list[Check], list[torch.device]]:
    try:
        devices = stage_devices(params.device)
    except SpinflowError as exc:
        return [Check(FAIL, "device", _one_line(exc))], []
    checks = [check_device(device) for device in devices]
    usable = [d for d, c in zip(devices, checks, strict=True) if c.status == PASS]
    return checks, usable


# ---------------------------------------------------------------------------------------------
# Engines


def _engine_note(engine: str) -> str:
    if engine == "continuous":
        from spinflow.engines.continuous import SUPPORTED

        return f"usable here for {', '.join(SUPPORTED)} models"
    if engine == "vllm":
        from importlib.metadata import version

        return f"usable here: vllm {version('vllm')}, {torch.cuda.device_count()} GPUs"
    return "usable here for any model (the reference)"


def check_engines(chosen: str) -> tuple[list[Check], list[str]]:
    """A line for each engine; the engines usable here. The params' engine fails if unusable."""
    from spinflow.engines import ENGINES, check_engine

    checks, usable = [], []
    for engine in ENGINES:
        name = f"engine {engine}" + (" (generate.engine)" if engine == chosen else "")
        try:
            check_engine(engine)
        except SpinflowError as exc:
            checks.append(Check(FAIL if engine == chosen else SKIP, name, _one_line(exc)))
            continue
        usable.append(engine)
        checks.append(Check(PASS, name, _engine_note(engine)))
    return checks, usable


# ---------------------------------------------------------------------------------------------
# The sandbox for model-written code


def check_sandbox(params: Params) -> list[Check]:
    from spinflow.sandbox import CONFINING_LAYERS as CONFINING
    from spinflow.sandbox import Call, Sandbox, confinement_problem

    try:
        with Sandbox(call_timeout=params.autoif.call_timeout) as sandbox:
            layers = sandbox.layers()
            result = sandbox.run([Call(SANDBOX_PROBE, "spinflow")])[0]
    except Exception as exc:
        return [Check(FAIL, "sandbox", _one_line(exc))]
    checks = [
        Check(PASS if layer.active else SKIP, f"sandbox {layer.name}", layer.detail)
        for layer in layers
    ]
    if result.passed:
        checks.append(Check(PASS, "sandbox call", f"a call ran in {result.seconds * 1000:.0f} ms"))
    else:
        why = f"{result.outcome.value}" + (f" ({result.kind.value})" if result.kind else "")
        message = " ".join(result.message.split())
        checks.append(
            Check(FAIL, "sandbox call", f"a call that returns True ended {why}: {message}")
        )
    problem = confinement_problem(layers)
    name = "sandbox confinement"
    if not problem:
        confining = [layer.name for layer in layers if layer.active and layer.name in CONFINING]
        checks.append(
            Check(
                PASS,
                name,
                f"model-written code kept from this user's files by {' and '.join(confining)}",
            )
        )
    elif not params.autoif.enabled:
        checks.append(
            Check(SKIP, name, f"autoif.enabled is false, so no model-written code runs; {problem}")
        )
    elif params.autoif.allow_weak_sandbox:
        checks.append(Check(PASS, name, f"weak, allowed by autoif.allow_weak_sandbox: {problem}"))
    else:
        checks.append(Check(FAIL, name, f"AutoIF would refuse to run: {problem}"))
    return checks


# ---------------------------------------------------------------------------------------------
# Accelerate configs


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}" + ("" if number == 1 else "s")


def _gpu_ids(value, gpus: int) -> list[int]:
    """The GPUs a config's ``gpu_ids`` lets a machine use (``all`` or none: every GPU)."""
    if value in (None, "", "all"):
        return list(range(gpus))
    return [int(part) for part in str(value).split(",") if part.strip()]


def _placement(config: str, cfg, device_setting: str) -> str:
    """Where the processes of one machine of ``cfg`` run here, in words; ConfigError if they
    do not fit."""
    from spinflow.errors import ConfigError

    machines, processes = int(cfg.num_machines or 1), int(cfg.num_processes or 1)
    if processes % machines:
        raise ConfigError(
            f"{config}: num_processes {processes} is not a multiple of num_machines {machines} "
            "(num_processes counts every machine's processes)"
        )
    per_machine = processes // machines
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.use_cpu or gpus == 0 or device_setting == "cpu":
        cores = _cpu_cores()
        if per_machine > cores:
            raise ConfigError(
                f"{config}: {per_machine} processes a machine on the CPU, more than its {cores} "
                "cores" + ("" if gpus else " (no GPU here)")
            )
        return f"{per_machine} processes a machine on the CPU ({cores} cores" + (
            ")" if gpus else ", no GPU here: gloo)"
        )
    ids = _gpu_ids(cfg.gpu_ids, gpus)
    missing = [i for i in ids if not 0 <= i < gpus]
    if missing:
        raise ConfigError(f"{config}: gpu_ids names GPU {missing[0]}; this machine has {gpus}")
    if per_machine > len(ids):
        raise ConfigError(
            f"{config}: {per_machine} processes a machine but {_count(len(ids), 'GPU')} here "
            "for them; a stage runs one process a GPU"
        )
    idle = f", {len(ids) - per_machine} left idle" if per_machine < len(ids) else ""
    return f"{per_machine} processes a machine on {_count(len(ids), 'GPU')}{idle}"


def _machines(config: str, cfg) -> str:
    from spinflow.errors import ConfigError

    machines = int(cfg.num_machines or 1)
    if machines == 1:
        return "1 machine"
    if cfg.machine_rank:
        raise ConfigError(
            f"{config}: machine_rank {cfg.machine_rank}; keep 0 in the file (the machine that "
            "runs dvc repro) and start the others with `spinflow worker <stage> --machine-rank k`"
        )
    if not cfg.main_process_ip:
        raise ConfigError(f"{config}: {machines} machines but no main_process_ip")
    return (
        f"{machines} machines, this one rank 0 at {cfg.main_process_ip}:"
        f"{cfg.main_process_port or 29500}; start `spinflow worker <stage> --machine-rank k` on "
        "the others"
    )


def check_accelerate_config(key: str, config: str | None, device_setting: str) -> Check:
    from spinflow.validation import _accelerate_problem

    name = f"accelerate {key}"
    if not config:
        return Check(SKIP, name, "null: its stages run in one process")
    problem = _accelerate_problem(key, config)
    if problem:
        return Check(FAIL, name, problem.removeprefix(f"{key}: "))
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        cfg = load_config_from_file(str(Path(config).expanduser()))
    except Exception as exc:
        return Check(FAIL, name, f"{config}: accelerate cannot read it: {_one_line(exc)}")
    try:
        placement = _placement(config, cfg, device_setting)
        machines = _machines(config, cfg)
    except SpinflowError as exc:
        return Check(FAIL, name, _one_line(exc))
    kind = getattr(cfg.distributed_type, "value", cfg.distributed_type)
    return Check(
        PASS,
        name,
        f"{config}: {kind}, mixed precision {cfg.mixed_precision}, {placement}, {machines}",
    )


def check_accelerate(params: Params) -> list[Check]:
    from spinflow.validation import ACCELERATE_KEYS

    return [check_accelerate_config(k, params.value(k), params.device) for k in ACCELERATE_KEYS]


# ---------------------------------------------------------------------------------------------
# The smoke test on a tiny model


@dataclass
class Smoke:
    """What a device's smoke test works with: the tiny checkpoint, its prompts and requests."""

    model_dir: Path
    tokenizer: object
    records: list[dict]
    requests: list


def prepare_smoke(params: Params, model_dir: Path) -> Smoke:
    """The built-in prompts of the smoke test as requests to the checkpoint in ``model_dir``."""
    from spinflow.chat import prompt_ids
    from spinflow.generation import Request
    from spinflow.models import load_tokenizer
    from spinflow.seeds import derive_seed
    from spinflow.tasks import generate_examples

    tokenizer = load_tokenizer(model_dir)
    records = generate_examples(PROMPTS, seed=params.data.seed)
    p = params.prompt
    requests = [
        Request(
            prompt_ids(tokenizer, r["prompt"], p.system_prompt, p.max_prompt_length),
            derive_seed(params.seed, r["id"]),
        )
        for r in records
    ]
    return Smoke(model_dir, tokenizer, records, requests)


def scored_logps(model, smoke: Smoke, completions) -> list[float]:
    """The training's summed log-prob of each completion's tokens (and end token) after its
    prompt, in float32."""
    from spinflow.chat import Encoded, collate
    from spinflow.logprobs import segment_logps

    encoded = []
    for request, completion in zip(smoke.requests, completions, strict=True):
        end = getattr(completion, "end_token_id", None) or smoke.tokenizer.eos_token_id
        answer = completion.token_ids + ([end] if completion.ended else [])
        encoded.append(Encoded(request.prompt_ids + answer, len(request.prompt_ids)))
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(encoded, smoke.tokenizer.pad_token_id).items()}
    with torch.no_grad():
        return segment_logps(model.eval(), batch).tolist()


def _engine_is_float32(engine, model) -> bool:
    if engine.name == "torch":
        return next(model.parameters()).dtype == torch.float32
    return getattr(engine, "dtype", None) == torch.float32


def check_generation(params: Params, device: torch.device, engine_name: str, smoke: Smoke):
    """The line of one engine on one device, and its completions (None when it failed)."""
    from spinflow.engines import open_engine
    from spinflow.engines.continuous import TOLERANCE as BF16_TOLERANCE
    from spinflow.generation import SamplingParams
    from spinflow.models import load_model

    name = f"generate {device} {engine_name}"
    g = params.generate
    sampling = SamplingParams(temperature=g.temperature, top_p=g.top_p, max_new_tokens=NEW_TOKENS)
    try:
        model = load_model(smoke.model_dir, device=device) if engine_name != "vllm" else None
        settings = g.model_copy(update={"engine": engine_name})
        engine = open_engine(
            settings, model, smoke.tokenizer, model_dir=smoke.model_dir, batch_size=PROMPTS
        )
        try:
            started = time.perf_counter()
            completions = engine.complete(smoke.requests, sampling, desc=f"doctor {engine_name}")
            seconds = time.perf_counter() - started
            float32 = _engine_is_float32(engine, model)
        finally:
            close = getattr(engine, "close", None)
            if close is not None:
                close()
        scorer = model if model is not None else load_model(smoke.model_dir, device=device)
        expected = scored_logps(scorer, smoke, completions)
    except Exception as exc:
        return Check(FAIL, name, _one_line(exc)), None
    tokens = [len(c.token_ids) + c.ended for c in completions]
    if len(completions) != len(smoke.requests) or not all(tokens):
        return Check(
            FAIL, name, f"{len(completions)} answers to {PROMPTS} prompts, tokens {tokens}"
        ), None
    differences = [abs(c.logp - e) for c, e in zip(completions, expected, strict=True)]
    if float32:
        worst, tolerance, unit = max(differences), LOGP_TOLERANCE, "an answer (float32)"
    else:
        worst = max(d / n for d, n in zip(differences, tokens, strict=True))
        tolerance, unit = BF16_TOLERANCE, "a token (bfloat16)"
    what = f"{sum(tokens)} tokens for {PROMPTS} prompts in {seconds:.2f} s"
    if not worst <= tolerance:
        return Check(
            FAIL,
            name,
            f"{what}, but the engine's log-probs differ from the training's by {worst:.1e} "
            f"{unit}, more than {tolerance:.0e}",
        ), None
    return Check(
        PASS,
        name,
        f"{what}; log-probs equal the training's within {worst:.0e} {unit}, tolerance {tolerance:.0e}",
    ), completions


def check_training(params: Params, device: torch.device, smoke: Smoke, completions) -> Check:
    """One SPIN step on the built-in prompts' real answers against ``completions``, as a
    training stage takes it (precision chosen as ``bf16`` says, the stages' loop)."""
    from spinflow.losses import spin_loss
    from spinflow.models import load_model
    from spinflow.pair_training import encode_pairs, resolve_optim, spin_iteration
    from spinflow.precision import TOLERANCE as BF16_TOLERANCE
    from spinflow.training import make_accelerator, merge_lora, seed_everything

    name = f"train {device}"
    pairs = [
        {
            "prompt": record["prompt"],
            "real": record["answer"],
            "generated": smoke.tokenizer.decode(c.token_ids, skip_special_tokens=True),
        }
        for record, c in zip(smoke.records, completions, strict=True)
    ]
    loss_kind = params.spin.loss
    try:
        optim, beta = params.train_for(0)
        # one optimizer step over every pair, at the full learning rate
        optim = optim.model_copy(
            update={
                "epochs": 1,
                "batch_size": len(pairs),
                "gradient_accumulation_steps": 1,
                "warmup_ratio": 0.0,
            }
        )
        examples = encode_pairs(smoke.tokenizer, pairs, params.prompt)
        model = load_model(smoke.model_dir, device=device)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        seed_everything(params.seed)
        optim, precision = resolve_optim(
            optim, model, smoke.tokenizer, examples, beta, loss_kind, device=device
        )
        accelerator = make_accelerator(optim, device)
        trained, result, _, _ = spin_iteration(
            accelerator,
            model,
            smoke.tokenizer,
            examples,
            optim,
            beta=beta,
            loss=loss_kind,
            seed=params.seed,
            desc="doctor train",
        )
        weights = merge_lora(trained).named_parameters()
        moved = max((p.detach() - before[n]).abs().max().item() for n, p in weights if n in before)
    except Exception as exc:
        return Check(FAIL, name, _one_line(exc))
    zero = torch.zeros(len(pairs))
    expected = spin_loss(zero, zero, zero, zero, beta=beta, kind=loss_kind).loss.item()
    tolerance = BF16_TOLERANCE * expected if precision.bf16 else LOSS_TOLERANCE
    loss = result.history[0]["loss"] if result.history else float("nan")
    how = precision.describe("spin.train.bf16")
    what = f"{result.steps} SPIN step in {result.seconds:.2f} s, {how}"
    if result.steps != 1:
        return Check(FAIL, name, f"{what}: {result.steps} optimizer steps, not 1")
    if not abs(loss - expected) <= tolerance:
        return Check(
            FAIL,
            name,
            f"{what}: loss {loss:.6f} where a policy equal to its reference has {expected:.6f} "
            f"(tolerance {tolerance:.0e}): the reference pass and the policy disagree",
        )
    if not moved > 0:
        return Check(FAIL, name, f"{what}: the step left every weight unchanged")
    return Check(
        PASS,
        name,
        f"{what}; loss {loss:.6f} = {expected:.6f} at equal policy and reference (tolerance "
        f"{tolerance:.0e}); largest weight change {moved:.1e}",
    )


def smoke_test(params: Params, devices: list[torch.device], engines: list[str]) -> Iterator[Check]:
    """On each device: each usable engine answers, then one SPIN step on their answers."""
    with tempfile.TemporaryDirectory(prefix="spinflow-doctor-") as directory:
        from spinflow.models import build_tiny_model

        try:
            model_dir = build_tiny_model(Path(directory) / "tiny", seed=params.seed, **TINY_MODEL)
            smoke = prepare_smoke(params, model_dir)
        except Exception as exc:
            yield Check(FAIL, "smoke test", f"cannot build the tiny model: {_one_line(exc)}")
            return
        # vLLM last (it takes most of a GPU's memory), and on the first GPU only (it uses the
        # GPUs CUDA_VISIBLE_DEVICES shows, from the first)
        order = sorted(engines, key=lambda e: e == "vllm")
        preferred = params.generate.engine
        for device in devices:
            answers = {}
            with _on(device):
                for engine in order:
                    if engine == "vllm" and device != devices[0]:
                        yield Check(
                            SKIP,
                            f"generate {device} vllm",
                            f"vLLM runs on the first GPU: see {devices[0]}",
                        )
                        continue
                    check, completions = check_generation(params, device, engine, smoke)
                    if completions is not None:
                        answers[engine] = completions
                    yield check
                if not answers:
                    yield Check(FAIL, f"train {device}", "no engine answered: nothing to train on")
                    continue
                completions = answers.get(preferred) or next(iter(answers.values()))
                yield check_training(params, device, smoke, completions)


# ---------------------------------------------------------------------------------------------
# The command


def run_checks(params: Params) -> Iterator[Check]:
    """Every check, in the order they are printed, each as soon as it is done."""
    device_checks, devices = check_devices(params)
    yield from device_checks
    engine_checks, engines = check_engines(params.generate.engine)
    yield from engine_checks
    yield from check_sandbox(params)
    yield from check_accelerate(params)
    if devices:
        yield from smoke_test(params, devices, engines)
    else:
        yield Check(SKIP, "smoke test", "no usable device")


def main(params: Params, params_file: str, *, as_json: bool = False) -> int:
    """Run every check and print them (a line each, or one JSON object); 1 if any failed."""
    started = time.perf_counter()
    checks: list[Check] = []
    for check in run_checks(params):
        checks.append(check)
        if not as_json:
            print(check.line(), flush=True)
    counts = {status: sum(c.status == status for c in checks) for status in (PASS, FAIL, SKIP)}
    seconds = time.perf_counter() - started
    if as_json:
        json.dump(
            {
                "params": params_file,
                "passed": counts[FAIL] == 0,
                "seconds": round(seconds, 1),
                "checks": [asdict(c) for c in checks],
            },
            sys.stdout,
            indent=2,
        )
        print()
    else:
        print(
            f"doctor ({params_file}): {counts[PASS]} passed, {counts[FAIL]} failed, "
            f"{counts[SKIP]} skipped in {seconds:.1f} s"
        )
    return 1 if counts[FAIL] else 0
