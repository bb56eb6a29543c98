"""AutoIF's model-written path end to end: a supervisor checkpoint that really writes.

A tiny model is fine-tuned, with the project's own SFT training, until it reproduces a fixed set
of supervision answers to the exact prompts the stages send it: one self-instruct answer with
eight new instructions, then per instruction one function with its cases (two right, one subtly
wrong, four malicious, one unparseable), then a 1-10 rating of every training query. The stages
of the pipeline then run on it in order (autoif_supervise, autoif_instructions, autoif_verify,
autoif_queries, autoif_sample_iter_0, autoif_train_iter_0) and every count between them is
checked, so the test fails when any step stops passing data along."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from spinflow.config import Params, default_params_dict, validate_params
from spinflow.io import read_jsonl, write_jsonl
from spinflow.methods.autoif import stages as autoif
from spinflow.methods.autoif.instructions import Instruction

ESCAPE_FILE = Path("/tmp/spinflow-autoif-escape.txt")  # what the writing function aims at

SEEDS = [
    {
        "id": "no_commas",
        "instruction": "Do not use any commas.",
        "functions": ["def evaluate(response):\n    return ',' not in response\n"],
        "cases": [
            {"response": "a b", "verdict": True},
            {"response": "a, b", "verdict": False},
            {"response": "", "verdict": True},
        ],
    },
    {
        "id": "short",
        "instruction": "Answer in fewer than 30 characters.",
        "functions": ["def evaluate(response):\n    return len(response) < 30\n"],
        "cases": [
            {"response": "hi", "verdict": True},
            {"response": "x" * 40, "verdict": False},
            {"response": "ok then", "verdict": True},
        ],
    },
    {
        "id": "has_digit",
        "instruction": "Include at least one digit.",
        "functions": ["def evaluate(response):\n    return any(c.isdigit() for c in response)\n"],
        "cases": [
            {"response": "a1", "verdict": True},
            {"response": "ab", "verdict": False},
            {"response": "2024", "verdict": True},
        ],
    },
]


def _answer(func: str, cases: list[tuple[str, bool]]) -> str:
    return json.dumps({"func": func, "cases": [{"input": i, "output": o} for i, o in cases]})


# (instruction the supervisor writes, its function answer, what becomes of it); ids sup_0000 …
WRITTEN = [
    (
        "Answer with an even number of characters.",
        _answer(
            "def evaluate(response):\n    return len(response) % 2 == 0",
            [("ab", True), ("abc", False), ("abcd", True)],
        ),
        "kept",
    ),
    (
        "Use an odd number of words.",
        _answer(
            "def evaluate(response):\n    return len(response.split()) % 2 == 1",
            [("one", True), ("one two", False), ("a b c", True)],
        ),
        "kept",
    ),
    (  # subtly wrong: three words are allowed, the function refuses them
        "Answer with at most three words.",
        _answer(
            "def evaluate(response):\n    return len(response.split()) < 3",
            [("one two three", True), ("a b", True), ("a b c d", False)],
        ),
        "wrong",
    ),
    (  # writes outside its scratch directory
        "End your answer with a full stop.",
        _answer(
            f"def evaluate(response):\n    with open('{ESCAPE_FILE}', 'w') as out:\n"
            "        out.write(response)\n    return response.endswith('.')",
            [("Done.", True), ("Done", False), ("Yes.", True)],
        ),
        "forbidden",
    ),
    (  # opens a network connection
        "Do not use the letter q.",
        _answer(
            "def evaluate(response):\n    import socket\n"
            "    socket.create_connection(('127.0.0.1', 9))\n    return 'q' not in response",
            [("abc", True), ("quiz", False), ("", True)],
        ),
        "forbidden",
    ),
    (  # fork bomb
        "Start your answer with a capital letter.",
        _answer(
            "def evaluate(response):\n    import os\n    while True:\n        os.fork()",
            [("Yes", True), ("yes", False), ("Ok", True)],
        ),
        "forbidden",
    ),
    (  # never returns
        "Answer in lowercase letters only.",
        _answer(
            "def evaluate(response):\n    while True:\n        pass",
            [("abc", True), ("Abc", False), ("xyz", True)],
        ),
        "timeout",
    ),
    (  # no JSON object: unparseable
        "Write exactly two paragraphs.",
        "def evaluate(response):\n    return response.count('\\n\\n') == 1",
        "unparseable",
    ),
]

# SFT prompts the queries are made of; the supervisor rates a query on the third as unanswerable
SFT_PROMPTS = [
    ("sft-0", "Describe the sea in one sentence.", 9),
    ("sft-1", "Name a fruit you like.", 9),
    ("sft-2", "Reply with the number 42 and nothing else.", 2),
]
TEST_PROMPTS = ["What is a river?", "Say hello."]

RUN = {  # the AutoIF settings of the run; the supervisor is trained on these prompts
    "seeds": "seeds.yaml",
    "iterations": 1,
    "supervisor_rounds": 1,
    "supervisor_instructions": len(WRITTEN),
    "supervisor_attempts": 1,
    "supervisor_max_new_tokens": 320,
    "top_p": 0.5,  # where the supervisor's next token holds more, sampling picks it
    "heldout": 1,
    "queries": 6,
    "eval_queries": 2,
    "samples": 4,
    "max_new_tokens": 8,
    "sandbox_workers": 2,
    "call_timeout": 1.0,
    "query_min_score": 8,
    "sft_first": True,
}
NO_BF16 = {"bf16": False, "batch_size": 4, "learning_rate": 1e-4}


def run_params(supervisor: Path) -> Params:
    raw = default_params_dict()
    raw["autoif"].update(enabled=True, supervisor=str(supervisor), **RUN)
    raw["autoif"]["train"].update(NO_BF16)
    raw["sft"].update(NO_BF16, epochs=1, patience=None)
    raw["generate"].update(engine="torch", dtype="float32")
    raw["prompt"].update(max_prompt_length=200, max_length=640)
    raw["resume"]["every_steps"] = None
    raw["tracking"]["enabled"] = False
    return validate_params(raw)


def supervision(root: Path, supervisor: Path) -> list[dict]:
    """What the supervisor must answer, for the exact prompts the stages send it (built by the
    stages' own functions from the run's params and seed library)."""
    from spinflow.methods.autoif.instructions import load_library

    params = run_params(supervisor)
    seeds = load_library(root / RUN["seeds"], min_cases=params.autoif.min_cases).instructions
    (round_,) = autoif.self_instruct_requests(params, seeds)
    records = [{**round_, "answer": "\n".join(f"- {text}" for text, _, _ in WRITTEN)}]
    requests = autoif.function_requests([text for text, _, _ in WRITTEN], 1)
    records += [
        {**r, "answer": answer} for r, (_, answer, _) in zip(requests, WRITTEN, strict=True)
    ]
    # every query the run can make: any SFT prompt with any training instruction (those that
    # survive verification, less the one autoif_queries holds out)
    survivors = [Instruction(s["id"], s["instruction"], (), ()) for s in SEEDS] + [
        Instruction(f"sup_{i:04d}", text, (), ())
        for i, (text, _, fate) in enumerate(WRITTEN)
        if fate == "kept"
    ]
    training, _ = autoif.split_heldout(survivors, params.autoif.heldout, params.seed)
    for source, prompt, score in SFT_PROMPTS:
        for instruction in training:
            request = autoif.query_score_request(source, prompt, instruction.text)
            records.append({**request, "answer": f"Score: {score}"})
    return records


def write_inputs(root: Path) -> None:
    (root / RUN["seeds"]).write_text(yaml.safe_dump(SEEDS, sort_keys=False), encoding="utf-8")
    data = root / "data/prepared"
    write_jsonl(
        data / "sft.jsonl", [{"id": i, "prompt": p, "answer": "ok"} for i, p, _ in SFT_PROMPTS]
    )
    write_jsonl(
        data / "test.jsonl",
        [{"id": f"test-{i}", "prompt": p, "answer": "ok"} for i, p in enumerate(TEST_PROMPTS)],
    )


def _next_token_checks(model_dir: Path, params: Params, records: list[dict]) -> list[str]:
    """Where the model's next token (teacher forced on prompt + answer, rendered as generation
    renders them) is not the answer's, or holds less than autoif.top_p + 0.1 of the probability
    at autoif.temperature: elsewhere top-p sampling keeps that token alone, so the model writes
    every answer exactly, sampled and greedily."""
    import torch

    from spinflow.chat import encode_example
    from spinflow.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir).eval()
    problems = []
    for record in records:
        encoded = encode_example(
            tokenizer,
            record["prompt"],
            record["answer"],
            system_prompt=params.prompt.system_prompt,
            max_prompt_length=params.prompt.max_prompt_length,
            max_length=params.prompt.max_length,
        )
        ids = torch.tensor([encoded.input_ids])
        with torch.inference_mode():
            logits = model(ids).logits[0, :-1].float()
        probs = (logits / params.autoif.temperature).softmax(-1)
        start = encoded.prompt_length - 1
        target = ids[0, encoded.prompt_length :]
        answer = probs[start:]
        top = answer.max(-1)
        wrong = (top.indices != target) | (top.values < params.autoif.top_p + 0.1)
        if bool(wrong.any()):
            at = int(wrong.nonzero()[0, 0])
            problems.append(f"{record['id']}: token {at} p={float(answer[at, target[at]]):.3f}")
    return problems


@pytest.fixture(scope="session")
def autoif_supervisor(tmp_path_factory) -> Path:
    """A tiny supervisor checkpoint that writes :data:`WRITTEN` and rates queries as
    :data:`SFT_PROMPTS` say; built once, its next-token margins checked before use."""
    import torch

    from spinflow.models import build_tiny_model
    from spinflow.nodes import Model
    from spinflow.sft_training import supervised

    root = tmp_path_factory.mktemp("autoif-supervisor")
    write_inputs(root)
    base = build_tiny_model(root / "base", seed=0, max_position_embeddings=1024)
    records = supervision(root, base)
    raw = default_params_dict()
    raw["sft"].update(
        bf16=False,
        batch_size=8,
        learning_rate=5e-3,
        epochs=25,
        patience=None,
        scheduler="linear",
        warmup_ratio=0.0,
        group_by_length=True,
    )
    raw["prompt"].update(max_prompt_length=200, max_length=640)
    raw["resume"]["every_steps"] = None
    params = validate_params(raw)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        source, problems = base, []
        for rounds in range(8):  # deterministic: the same rounds on every run here
            out = root / f"round-{rounds}"
            target = Model(
                "supervisor",
                out / "model",
                "supervisor",
                "supervisor",
                "test",
                train_metrics=out / "metrics.json",
                steps_csv=out / "steps.csv",
                timings=out / "timings.json",
            )
            supervised(
                params, target, source=source, records=records, max_steps=None, extra_inputs={}
            )
            source = target.path
            problems = _next_token_checks(source, run_params(source), records)
            if not problems:
                return source
    finally:
        torch.set_num_threads(threads)
    pytest.fail(f"the supervisor did not learn its answers: {problems[:5]}")


def test_model_written_functions_from_supervision_to_training(
    autoif_supervisor, tiny_checkpoint_session, tmp_path, monkeypatch, torch_single_thread
):
    """Two written functions survive cross-validation, the subtly wrong one and the four
    malicious ones are dropped with their accuracy, the malicious calls are refused or timed out
    by the sandbox and counted, the unparseable answer is dropped with its reason, the supervisor
    drops the queries it rates low, and what survives is sampled, fine-tuned on, then trained on
    with DPO."""
    from spinflow.sandbox import active_layers

    active = {layer.name for layer in active_layers() if layer.active}
    if not {"seccomp", "landlock"} <= active:
        pytest.skip(
            f"the attacks' outcomes are asserted with seccomp and Landlock; active: {active}"
        )
    monkeypatch.chdir(tmp_path)
    write_inputs(tmp_path)
    shutil.copytree(tiny_checkpoint_session, tmp_path / "models/theta_0")  # θ0 writes noise
    ESCAPE_FILE.unlink(missing_ok=True)
    params = run_params(autoif_supervisor)

    # ---- autoif_supervise: the supervisor's eight instructions and seven parseable answers
    from spinflow import models

    loads: list[str] = []
    load_model = models.load_model

    def counting_load(path, **kwargs):
        loads.append(str(path))
        return load_model(path, **kwargs)

    monkeypatch.setattr(models, "load_model", counting_load)
    written = autoif.autoif_supervise(params)
    monkeypatch.setattr(models, "load_model", load_model)
    assert len(loads) == 1  # one load of the supervisor for both rounds of questions
    assert written["instructions_written"] == len(WRITTEN) == written["function_answers"]
    assert written["functions_parsed"] == len(WRITTEN) - 1
    assert written["dropped"] == {"unparseable_supervisor_output": 1}
    assert [
        (d["id"], d["reason"], d["detail"])
        for d in read_jsonl(tmp_path / "autoif/supervised/drops.jsonl")
    ] == [("sup_0007#r0", "unparseable_supervisor_output", "no JSON object in the answer")]
    items = yaml.safe_load((tmp_path / "autoif/supervised/instructions.yaml").read_text("utf-8"))
    assert [i["instruction"] for i in items] == [text for text, _, _ in WRITTEN]
    for item, (_, answer, fate) in zip(items, WRITTEN, strict=True):
        expected = [] if fate == "unparseable" else [json.loads(answer)["func"]]
        assert item["functions"] == expected and len(item["cases"]) == 3 * len(expected)

    # ---- autoif_instructions: the seeds and the seven written items with a function
    made = autoif.autoif_instructions(params)
    assert made["instructions_kept"] == len(SEEDS) + len(WRITTEN) - 1
    assert made["dropped"] == {"no_function": 1}

    # ---- autoif_verify: cross-validation on the written cases, in the sandbox
    verified = autoif.autoif_verify(params)
    kept = read_jsonl(tmp_path / "autoif/verified/instructions.jsonl")
    assert [i["id"] for i in kept] == ["no_commas", "short", "has_digit", "sup_0000", "sup_0001"]
    assert verified["functions_checked"] == len(SEEDS) + len(WRITTEN) - 1
    assert verified["functions_kept"] == 5
    refused = "accuracy 0.00 on 3 cases < 0.8 (3 calls raised or were refused)"
    assert [
        (d["id"], d["reason"], d["detail"])
        for d in read_jsonl(tmp_path / "autoif/verified/drops.jsonl")
        if d["reason"] == "low_accuracy"
    ] == [
        ("sup_0002#f0", "low_accuracy", "accuracy 0.67 on 3 cases < 0.8"),
        ("sup_0003#f0", "low_accuracy", refused),
        ("sup_0004#f0", "low_accuracy", refused),
        ("sup_0005#f0", "low_accuracy", refused),
        ("sup_0006#f0", "low_accuracy", refused),
    ]
    assert verified["dropped"] == {"low_accuracy": 5, "too_few_functions": 5}
    # the attacks: writing outside the scratch directory, a connection and fork() refused,
    # the endless loop stopped by the clock; all counted in the stage's metrics
    assert verified["sandbox_errors"] == {"forbidden": 9, "timeout": 3}
    assert verified["sandbox_calls"] == 3 * verified["functions_checked"]
    assert not ESCAPE_FILE.exists()

    # ---- autoif_queries: the supervisor rates every training query, two fall below 8
    queries = autoif.autoif_queries(params)
    assert queries["query_scoring"] == "on" and queries["train_instructions"] == 4
    assert queries["train_queries_made"] == RUN["queries"]
    assert queries["train_queries_dropped"] == {"low_query_score": 2}
    assert queries["train_queries"] == RUN["queries"] - 2
    train = read_jsonl(tmp_path / "autoif/queries/train.jsonl")
    assert {q["source_id"] for q in train} == {"sft-0", "sft-1"}
    ratings = {r["id"]: r["score"] for r in read_jsonl(tmp_path / "autoif/queries/scores.jsonl")}
    assert sorted(ratings.values()) == [2, 2, 9, 9, 9, 9]
    dropped = read_jsonl(tmp_path / "autoif/queries/drops.jsonl")
    assert [(d["reason"], d["detail"]) for d in dropped] == [("low_query_score", "rated 2 < 8")] * 2

    # ---- autoif_sample_iter_0: θ0's samples scored by the surviving functions
    sampled = autoif.autoif_sample(params, 0)
    samples = read_jsonl(tmp_path / "autoif/iter_0/samples.jsonl")
    assert sampled["samples"] == len(samples) == len(train) * RUN["samples"]
    assert {s["query"] for s in samples} == {q["id"] for q in train}
    assert sampled["sandbox_calls"] == len(samples) and sampled["sandbox_errors"] == {}
    sft = read_jsonl(tmp_path / "autoif/iter_0/sft.jsonl")
    pairs = read_jsonl(tmp_path / "autoif/iter_0/pairs.jsonl")
    assert sampled["samples_passing_all"] == len(sft) > 0
    assert sampled["pairs"] == len(pairs) > 0

    # ---- autoif_train_iter_0: SFT on the passing samples, then DPO on the pairs
    trained = autoif.autoif_train(params, 0)
    assert trained["sft_examples"] == len(sft) and trained["sft_optimizer_steps"] >= 1
    assert trained["pairs"] == len(pairs) and trained["optimizer_steps"] >= 1
    model = tmp_path / "models/autoif_theta_1"
    assert (model / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["autoif_theta_1", "theta_0"]
    made_by = json.loads((model / "provenance.json").read_text(encoding="utf-8"))
    assert made_by["params"]["sft_first"]["sft_examples"] == len(sft)
    assert set(made_by["inputs"]) == {"model", "pairs", "sft"}


@pytest.mark.parametrize(
    "text, score",
    [("Score: 9", 9), ("score=10.", 10), ("I would say 7 out of 10", 7), ("Score: 3/10", 3)],
)
def test_query_ratings_parse(text, score):
    assert autoif.parse_query_score(text) == score


@pytest.mark.parametrize("text", ["Score: eleven", "0", "It depends.", "2.5"])
def test_a_rating_without_a_score_says_so(text):
    with pytest.raises(ValueError, match="no score from 1 to 10 in the answer"):
        autoif.parse_query_score(text)
