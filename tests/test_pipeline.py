"""Tests for spinflow.pipeline: dvc.yaml rendered from params.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from spinflow import cli, pipeline
from spinflow.config import default_params_dict, load_params, validate_params
from spinflow.errors import SpinflowError
from spinflow.graph import build

REPO = Path(__file__).resolve().parents[1]


def _params(**sections):
    """Defaults (with SFT and the SFT-extra baseline on) with some keys changed:
    ``_params(spin={"iterations": 4})``."""
    raw = default_params_dict()
    raw["sft"]["enabled"] = True
    raw["sft_extra"]["enabled"] = True
    raw["spin"]["accelerate_config"] = None
    for section, changes in sections.items():
        _merge(raw[section], changes)
    return validate_params(raw)


def _merge(into: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and value:
            _merge(into[key], value)
        else:
            into[key] = value


def _names(entries) -> list[str]:
    """Paths of a stage's outs/metrics/plots, whether plain strings or {path: options}."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, dotted
        node = node[part]
    return node


# ---------------------------------------------------------------------------------------------
# The committed files


def test_committed_dvc_yaml_matches_params():
    problem = pipeline.check(load_params(REPO / "params.yaml"), REPO / "dvc.yaml")
    assert problem is None, problem


def test_committed_dvc_yaml_names_existing_scripts_and_code():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for name, stage in stages.items():
        for dep in stage["deps"]:
            if dep.startswith(("stages/", "src/")):
                assert (REPO / dep).is_file(), f"{name}: {dep}"
        script = next(part for part in stage["cmd"].split() if part.startswith("stages/"))
        assert (REPO / script).is_file(), f"{name}: {script}"


# ---------------------------------------------------------------------------------------------
# render


def test_render_four_iterations_has_exactly_the_expected_stages():
    stages = pipeline.render(_params(spin={"iterations": 4}))["stages"]
    expected = {"prepare_model", "prepare_data", "sft", "eval_sft", "sft_extra", "eval_sft_extra"}
    expected |= {"report", "validate_params"}
    for k in range(4):
        expected |= {f"generate_iter_{k}", f"train_iter_{k}", f"eval_iter_{k}"}
    assert set(stages) == expected
    assert len(stages) == 20
    # the equal-compute baseline is one switch away
    stages = pipeline.render(_params(spin={"iterations": 4}, sft_extra={"compute": True}))["stages"]
    assert set(stages) == expected | {"sft_extra_compute", "eval_sft_extra_compute"}


def test_iterations_chain_models():
    stages = pipeline.render(_params(spin={"iterations": 3}))["stages"]
    for k in range(3):
        theta_k = "models/theta_0" if k == 0 else f"models/theta_{k}"
        assert theta_k in stages[f"generate_iter_{k}"]["deps"]
        assert theta_k in stages[f"train_iter_{k}"]["deps"]
        assert f"models/theta_{k + 1}" in _names(stages[f"train_iter_{k}"]["outs"])
        assert f"models/theta_{k + 1}" in stages[f"eval_iter_{k}"]["deps"]
        assert stages[f"generate_iter_{k}"]["outs"] == [f"generated/iter_{k}"]
        assert stages[f"generate_iter_{k}"]["cmd"] == f"python stages/generate.py generate_iter_{k}"
        assert stages[f"train_iter_{k}"]["cmd"] == f"python stages/train.py train_iter_{k}"
        assert stages[f"eval_iter_{k}"]["cmd"] == f"python stages/evaluate.py eval_iter_{k}"
        opponent = "eval/sft" if k == 0 else f"eval/iter_{k - 1}"
        assert opponent in stages[f"eval_iter_{k}"]["deps"]
    report_deps = stages["report"]["deps"]
    for name in ("sft", "iter_0", "iter_1", "iter_2", "sft_extra"):
        assert f"metrics/eval_{name}.json" in report_deps


def test_every_dependency_is_a_source_file_or_exactly_one_stage_output():
    stages = pipeline.render(_params(spin={"iterations": 3}))["stages"]
    produced: dict[str, str] = {}
    for name, stage in stages.items():
        outputs = stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", [])
        for path in _names(outputs):
            assert path not in produced, f"{path} made by {produced.get(path)} and {name}"
            produced[path] = name
    for name, stage in stages.items():
        for dep in stage["deps"]:
            if name == "validate_params" and dep == "params.yaml":
                continue
            if not dep.startswith(("stages/", "src/")):
                assert dep in produced, f"{name} depends on {dep}, which no stage makes"
                assert produced[dep] != name


def test_every_listed_param_exists_in_params():
    params = _params(spin={"iterations": 3, "per_iteration": {"iter_1": {"learning_rate": 1e-6}}})
    tree = params.model_dump(mode="json")
    for name, stage in pipeline.render(params)["stages"].items():
        listed = stage.get("params", [])
        for key in listed:
            _lookup(tree, key)
        assert len(listed) == len(set(listed)), name


def test_stages_list_only_what_they_read():
    stages = pipeline.render(_params(spin={"iterations": 2}))["stages"]
    for k in range(2):
        assert "spin.train" not in stages[f"generate_iter_{k}"]["params"]
        assert "eval" not in stages[f"train_iter_{k}"]["params"]
        assert "generate" not in stages[f"train_iter_{k}"]["params"]
        assert "spin.train" not in stages[f"eval_iter_{k}"]["params"]
        assert "spin" not in stages[f"train_iter_{k}"]["params"]
    assert "eval" not in stages["sft"]["params"]
    # switches that remove rows are listed: DVC does not re-run a stage whose deps only shrank
    assert stages["report"]["params"] == [
        "sft.enabled",
        "lobass",
        "spin.iterations",
        "spin.start",
        "sft_extra",
        "autoif.enabled",
        "autoif.iterations",
        # the rule that chooses the iteration a user keeps, on the validation split
        "tracking.champion_metric",
        "tracking.champion_mode",
    ]


def test_removing_an_override_changes_the_command_dvc_compares():
    """DVC compares only the params a stage lists, so an override that disappears from the list
    must change something DVC does compare: the command."""
    with_override = _params(spin={"iterations": 2, "per_iteration": {"iter_1": {"beta": 0.3}}})
    stages = pipeline.render(with_override)["stages"]
    plain = pipeline.render(_params(spin={"iterations": 2}))["stages"]
    for name in ("train_iter_1", "eval_iter_1"):
        assert stages[name]["cmd"].endswith(" --override spin.per_iteration.iter_1"), name
        assert stages[name]["cmd"] != plain[name]["cmd"]
    assert stages["train_iter_0"]["cmd"] == plain["train_iter_0"]["cmd"]


def test_per_iteration_override_is_listed_only_by_its_iteration():
    params = _params(spin={"iterations": 4, "per_iteration": {"iter_2": {"learning_rate": 1e-7}}})
    stages = pipeline.render(params)["stages"]
    key = "spin.per_iteration.iter_2"
    listing = {
        name
        for name, stage in stages.items()
        if any("per_iteration" in p for p in stage.get("params", []))
    }
    assert listing == {"train_iter_2", "eval_iter_2"}
    assert key in stages["train_iter_2"]["params"]
    assert key in stages["eval_iter_2"]["params"]
    # the rest of those stages is as without the override
    plain = pipeline.render(_params(spin={"iterations": 4}))["stages"]
    for name in ("train_iter_2", "eval_iter_2"):
        without = {
            **stages[name],
            "params": [p for p in stages[name]["params"] if p != key],
            "cmd": stages[name]["cmd"].removesuffix(f" --override {key}"),
        }
        assert without == plain[name]
    for name in set(stages) - {"train_iter_2", "eval_iter_2"}:
        assert stages[name] == plain[name], name


@pytest.mark.parametrize("mix_previous", [0, 1, 2])
def test_mix_previous_sets_the_pairs_each_iteration_trains_on(mix_previous):
    stages = pipeline.render(_params(spin={"iterations": 3, "mix_previous": mix_previous}))[
        "stages"
    ]
    for k in range(3):
        generated = [d for d in stages[f"train_iter_{k}"]["deps"] if d.startswith("generated/")]
        first = max(0, k - mix_previous)
        assert generated == [f"generated/iter_{j}" for j in range(first, k + 1)]


def test_mix_previous_one_includes_the_previous_iteration_only():
    stages = pipeline.render(_params(spin={"iterations": 3, "mix_previous": 1}))["stages"]
    assert "generated/iter_1" in stages["train_iter_2"]["deps"]
    assert "generated/iter_0" not in stages["train_iter_2"]["deps"]
    stages = pipeline.render(_params(spin={"iterations": 3, "mix_previous": 0}))["stages"]
    assert "generated/iter_1" not in stages["train_iter_2"]["deps"]


def test_sft_disabled_starts_from_the_base_model():
    stages = pipeline.render(_params(sft={"enabled": False}, spin={"iterations": 2}))["stages"]
    assert "sft" not in stages
    assert "models/base" in stages["generate_iter_0"]["deps"]
    assert "models/theta_0" not in stages["generate_iter_0"]["deps"]
    assert "models/base" in stages["train_iter_0"]["deps"]
    assert "models/base" in stages["eval_sft"]["deps"]
    assert "models/base" in stages["sft_extra"]["deps"]
    assert "models/theta_1" in _names(stages["train_iter_0"]["outs"])
    assert not any("theta_0" in str(stage) for stage in stages.values())


def test_sft_extra_disabled():
    stages = pipeline.render(_params(sft_extra={"enabled": False}, spin={"iterations": 2}))[
        "stages"
    ]
    assert "sft_extra" not in stages and "eval_sft_extra" not in stages
    assert "metrics/eval_sft_extra.json" not in stages["report"]["deps"]


def test_sft_extra_waits_for_every_spin_iteration():
    stages = pipeline.render(_params(spin={"iterations": 3}))["stages"]
    deps = stages["sft_extra"]["deps"]
    for k in range(3):
        assert f"metrics/spin_steps_iter_{k}.json" in deps
        # only the step count, not the full training metrics, so a faster run does not re-run it
        assert f"metrics/train_iter_{k}.json" not in deps


def test_accelerate_config_launches_training_stages():
    config = "configs/accelerate/multi_gpu.yaml"
    stages = pipeline.render(_params(spin={"iterations": 2, "accelerate_config": config}))["stages"]
    launcher = f"accelerate launch --config_file {config}"
    assert stages["train_iter_0"]["cmd"] == f"{launcher} stages/train.py train_iter_0"
    assert stages["train_iter_1"]["cmd"] == f"{launcher} stages/train.py train_iter_1"
    assert stages["sft"]["cmd"] == f"{launcher} stages/sft.py sft"
    assert stages["sft_extra"]["cmd"] == f"{launcher} stages/sft_extra.py sft_extra"
    assert stages["generate_iter_0"]["cmd"].startswith("python ")
    assert stages["eval_iter_0"]["cmd"].startswith("python ")
    assert stages["prepare_model"]["cmd"] == "python stages/prepare_model.py prepare_model"


def test_validate_params_comes_first_reads_the_whole_file_and_writes_nothing():
    stages = pipeline.render(_params(spin={"iterations": 2}))["stages"]
    name, first = next(iter(stages.items()))
    assert name == "validate_params"
    assert first["cmd"] == "python stages/validate_params.py validate_params"
    # the whole file as a dependency: any change to it, an unknown key included, re-runs it
    assert "params.yaml" in first["deps"] and "params" not in first
    # nothing another stage could depend on, so its re-runs re-run nothing else
    assert not {"outs", "metrics", "plots"} & set(first)
    for other, stage in stages.items():
        assert not any(d.startswith("params.yaml") for d in stage["deps"][1:]) or other == name


def test_the_accelerate_config_is_checked_by_validate_params_only():
    config = "configs/accelerate/multi_gpu.yaml"
    stages = pipeline.render(_params(spin={"iterations": 1, "accelerate_config": config}))["stages"]
    assert stages["validate_params"]["deps"][-2:] == ["params.yaml", config]
    assert [name for name, stage in stages.items() if config in stage["deps"]] == [
        "validate_params"
    ]


@pytest.mark.parametrize(
    ("key", "source"), [("data", "data"), ("data", "."), ("model", "models/theta_1")]
)
def test_a_local_source_that_overlaps_an_output_is_refused(tmp_path, monkeypatch, key, source):
    # DVC would stop with "both a dependency and an output" (or a cycle) before any stage runs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "models" / "theta_1").mkdir(parents=True)
    with pytest.raises(SpinflowError) as info:
        build(_params(**{key: {"source": source}}))
    message = str(info.value)
    assert message.startswith(f"{key}.source: {source} overlaps "), message
    assert "both an input and an output" in message


def test_metrics_and_plots_are_not_cached():
    stages = pipeline.render(_params(spin={"iterations": 2}))["stages"]
    for name, stage in stages.items():
        for entry in stage.get("metrics", []) + stage.get("plots", []):
            assert next(iter(entry.values()))["cache"] is False, name


def test_render_text_is_plain_yaml_with_a_header():
    params = _params(spin={"iterations": 3})
    text = pipeline.render_text(params)
    assert text.startswith("# Rendered from params.yaml by `spinflow pipeline write`")
    assert "&id" not in text and "*id" not in text
    assert yaml.safe_load(text) == pipeline.render(params)


# ---------------------------------------------------------------------------------------------
# Code dependencies


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_import_closure_follows_lazy_relative_and_package_imports(tmp_path):
    src = _package(
        tmp_path / "src",
        {
            "spinflow/__init__.py": "",
            "spinflow/a.py": "from spinflow import b\n",
            "spinflow/b.py": "def f():\n    from spinflow.sub.c import g\n",
            "spinflow/sub/__init__.py": "",
            "spinflow/sub/c.py": "from . import d\nfrom ..e import x\nimport json\n",
            "spinflow/sub/d.py": "",
            "spinflow/e.py": "x = 1\n",
            "spinflow/unused.py": "",
        },
    )
    script = tmp_path / "stage.py"
    script.write_text("import os\nfrom spinflow.a import b\n", encoding="utf-8")
    closure = pipeline.import_closure(script, src)
    names = {str(Path(p).relative_to(src)) for p in closure}
    assert names == {
        "spinflow/__init__.py",
        "spinflow/a.py",
        "spinflow/b.py",
        "spinflow/sub/__init__.py",
        "spinflow/sub/c.py",
        "spinflow/sub/d.py",
        "spinflow/e.py",
    }


def test_import_closure_names_an_unparsable_module(tmp_path):
    src = _package(tmp_path / "src", {"spinflow/__init__.py": "", "spinflow/a.py": "def (:\n"})
    script = tmp_path / "stage.py"
    script.write_text("import spinflow.a\n", encoding="utf-8")
    with pytest.raises(SpinflowError, match=r"spinflow/a.py:1: cannot parse"):
        pipeline.import_closure(script, src)


def test_every_stage_lists_its_scripts_import_closure(monkeypatch):
    monkeypatch.chdir(REPO)
    params = _params(spin={"iterations": 2})
    graph = build(params)
    stages = pipeline.render(params)["stages"]
    for name, stage in stages.items():
        script = next(part for part in stage["cmd"].split() if part.startswith("stages/"))
        code = [d for d in stage["deps"] if d.startswith("src/")]
        stage_node = graph.stage(name)
        off = pipeline.switched_off(params, stage_node)
        loaded = stage_node.code
        assert code == pipeline.import_closure(script, skip=off, loaded=loaded), name
        assert set(code) <= set(pipeline.import_closure(script, loaded=loaded)), name
        assert stage["deps"][0] == script


def test_code_dependencies_include_the_modules_the_issue_found_missing(monkeypatch):
    monkeypatch.chdir(REPO)
    stages = pipeline.render(_params(spin={"iterations": 2}))["stages"]
    every_stage = {"config", "io", "graph", "runner", "errors"}
    for name, stage in stages.items():
        for module in every_stage:
            assert f"src/spinflow/{module}.py" in stage["deps"], (name, module)
    for module in ("losses", "chat", "evaluation", "recipes/evaluate", "provenance"):
        assert f"src/spinflow/{module}.py" in stages["eval_iter_0"]["deps"], module
    for module in ("methods/spin/train", "pair_training", "training", "losses", "chat"):
        assert f"src/spinflow/{module}.py" in stages["train_iter_0"]["deps"], module
    # a method's stages do not depend on another method's recipe
    assert "src/spinflow/methods/spin/train.py" not in stages["sft"]["deps"]
    assert "src/spinflow/methods/sft/stages.py" not in stages["train_iter_0"]["deps"]


def test_every_stage_runs_through_the_script_the_graph_names():
    graph = build(_params(spin={"iterations": 2}))
    for stage in graph.stages.values():
        text = (REPO / "stages" / f"{stage.script}.py").read_text(encoding="utf-8")
        assert f'run_stage("{stage.script}",' in text, stage.name


# ---------------------------------------------------------------------------------------------
# write and check


def test_write_then_check(tmp_path):
    params = _params(spin={"iterations": 2})
    path = pipeline.write(params, tmp_path / "dvc.yaml")
    assert path.read_text(encoding="utf-8") == pipeline.render_text(params)
    assert pipeline.check(params, path) is None


def test_check_reports_missing_and_extra_stages_in_one_line(tmp_path):
    path = pipeline.write(_params(spin={"iterations": 3}), tmp_path / "dvc.yaml")
    problem = pipeline.check(_params(spin={"iterations": 2}), path)
    assert problem is not None
    assert "\n" not in problem
    assert problem == (
        f"{path} does not match params.yaml: stages differ (extra: ['eval_iter_2', "
        "'generate_iter_2', 'train_iter_2'], missing: []); run `spinflow pipeline write`"
    )


def test_check_reports_changed_definitions(tmp_path):
    path = pipeline.write(_params(spin={"iterations": 3}), tmp_path / "dvc.yaml")
    changed = _params(spin={"iterations": 3, "per_iteration": {"iter_1": {"beta": 0.2}}})
    problem = pipeline.check(changed, path)
    assert "\n" not in problem
    assert "stages differ in their definition: ['eval_iter_1', 'train_iter_1']" in problem


def test_check_missing_file(tmp_path):
    problem = pipeline.check(_params(), tmp_path / "dvc.yaml")
    assert problem == f"{tmp_path / 'dvc.yaml'}: missing; run `spinflow pipeline write`"


def test_pipeline_cli(tmp_path, capsys):
    params_file = tmp_path / "params.yaml"
    raw = default_params_dict()
    raw["spin"]["iterations"] = 2
    params_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
    dvc_file = tmp_path / "dvc.yaml"
    base = ["--params", str(params_file), "pipeline"]

    assert cli.main([*base, "write", "--dvc-file", str(dvc_file)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {dvc_file} (2 iterations)"
    assert cli.main([*base, "check", "--dvc-file", str(dvc_file)]) == 0
    assert capsys.readouterr().out.strip() == f"{dvc_file}: matches {params_file}"

    raw["spin"]["iterations"] = 3
    params_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert cli.main([*base, "check", "--dvc-file", str(dvc_file)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {dvc_file} does not match params.yaml: stages differ")
    assert "missing: ['eval_iter_2', 'generate_iter_2', 'train_iter_2']" in err


def test_every_module_a_stage_process_imported_is_a_code_dependency(tiny_dvc_repo):
    """What the stage processes of the tiny pipeline really imported (recorded at exit by
    tests/device_hook/sitecustomize.py) is covered by the code dependencies dvc.yaml lists."""
    stages = yaml.safe_load((tiny_dvc_repo.root / "dvc.yaml").read_text())["stages"]
    folder = tiny_dvc_repo.root / ".spinflow" / "test-imports"
    records = [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))]
    assert {"sft", "generate_iter_0", "train_iter_0", "eval_iter_0", "report"} <= {
        r["stage"] for r in records
    }
    for record in records:
        deps = set(stages[record["stage"]]["deps"])
        assert record["script"] in deps
        assert set(record["files"]) <= deps, (record["stage"], set(record["files"]) - deps)


def test_code_dependencies_follow_what_the_params_switch_on(monkeypatch):
    """Tracking is nobody's dependency; a stage depends on the engine generate.engine names and
    on AutoIF and the sandbox only where AutoIF runs in it."""
    monkeypatch.chdir(REPO)
    stages = pipeline.render(_params(spin={"iterations": 2}))["stages"]
    every = {d for stage in stages.values() for d in stage["deps"]}
    assert not {d for d in every if d.startswith("src/spinflow/tracking/")}
    for module in (
        "engines/vllm",
        "sandbox",
        "sandbox_worker",
        "methods/autoif/stages",
        "methods/autoif/instructions",
        "harness",
    ):
        assert f"src/spinflow/{module}.py" not in every, module
    continuous = "src/spinflow/engines/continuous.py"
    generating = {name for name, stage in stages.items() if continuous in stage["deps"]}
    assert generating == {
        "eval_sft",
        "eval_sft_extra",
        "generate_iter_0",
        "generate_iter_1",
        "eval_iter_0",
        "eval_iter_1",
    }

    vllm = pipeline.render(_params(spin={"iterations": 2}, generate={"engine": "vllm"}))["stages"]
    assert "src/spinflow/engines/vllm.py" in vllm["generate_iter_0"]["deps"]
    assert continuous not in vllm["generate_iter_0"]["deps"]
    assert "src/spinflow/engines/vllm.py" not in vllm["train_iter_0"]["deps"]


def test_an_edit_re_runs_only_the_stages_that_run_the_edited_code(tiny_dvc_repo, tmp_path):
    """On the tiny pipeline (default engine, AutoIF off): editing tracking or the vllm engine
    leaves `dvc status` clean; editing the continuous engine changes exactly the stages that
    generate."""
    repo = tiny_dvc_repo.copy(tmp_path / "repo")

    def touch(module: str) -> None:
        with open(repo.root / "src" / "spinflow" / module, "a", encoding="utf-8") as f:
            f.write("# edited\n")

    def changed() -> set[str]:
        return set(json.loads(repo.run("dvc", "status", "--json") or "{}"))

    for module in ("tracking/__init__.py", "tracking/runs.py", "engines/vllm.py", "sandbox.py"):
        touch(module)
    assert changed() == set()
    touch("engines/continuous.py")
    assert changed() == {"eval_sft", "generate_iter_0", "eval_iter_0"}
