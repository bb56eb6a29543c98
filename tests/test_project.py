"""The project's own files agree with each other: README, CI, params, schema, recipes."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from spinflow.config import default_params_dict, load_params, validate_params
from spinflow.graph import build
from spinflow.validation import check_dvc_keys

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick_start, flags=re.S)
    return [
        line for block in blocks for line in block.splitlines() if line and not line.startswith("#")
    ]


def test_readme_quick_start_has_exactly_two_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("dvc repro")
    assert commands[1].endswith("-m pytest -q")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = _readme_commands()[1]
    assert test_command in ci.splitlines(), "README test command not found verbatim in .ci/run"


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [link.split("#", 1)[0] for link in links if not link.startswith(("http", "#"))]


def test_readme_and_docs_links_point_to_files():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for link in _relative_links(page):
            assert (page.parent / link).exists(), f"{page.relative_to(ROOT)}: broken link {link}"


def test_readme_links_every_docs_page():
    linked = {(ROOT / link).resolve() for link in _relative_links(ROOT / "README.md")}
    pages = set((ROOT / "docs").glob("*.md"))
    assert not {page.name for page in pages if page.resolve() not in linked}


def test_params_yaml_equals_the_schema_defaults():
    assert load_params(ROOT / "params.yaml").model_dump(mode="json") == default_params_dict()


def test_paper_recipe_validates_and_matches_the_paper():
    params = load_params(ROOT / "configs" / "paper.yaml")
    assert params.spin.iterations == 4
    assert params.data.num_pool == 50_000
    assert params.model.source == "alignment-handbook/zephyr-7b-sft-full"
    assert params.spin.train.optimizer == "rmsprop"
    assert params.spin.beta == 0.1
    assert params.train_for(0)[0].learning_rate == 5e-7
    assert params.train_for(1)[0].learning_rate == 5e-7
    assert params.train_for(2)[0].learning_rate == 1e-7
    assert params.train_for(3)[0].learning_rate == 1e-7
    assert params.prompt.max_length == 1024 and params.prompt.max_prompt_length == 512
    assert params.generate.max_new_tokens == 256
    assert (ROOT / params.spin.accelerate_config).exists()


def test_study_preset_has_the_sizes_the_study_needs():
    path = ROOT / "configs" / "study-cpu.yaml"
    params = load_params(path)
    # a file for `cp … params.yaml && dvc repro`: every key a stage lists is in it
    check_dvc_keys(yaml.safe_load(path.read_text(encoding="utf-8")), build(params), str(path))
    assert params.data.num_sft >= 512 and params.data.num_pool >= 256
    assert params.data.num_test >= 256 and params.generate.max_new_tokens >= 128
    assert params.data.pool == "sft" and params.spin.iterations == 3
    assert params.sft_extra.enabled and params.sft_extra.compute


def test_accelerate_configs_parse():
    for path in (ROOT / "configs" / "accelerate").glob("*.yaml"):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert config["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED"}, path


def test_defaults_validate_from_an_empty_file():
    assert validate_params({}).model_dump(mode="json") == default_params_dict()
