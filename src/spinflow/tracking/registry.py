"""The registered model: one version per SPIN iteration's checkpoint, aliases, cleanup.

Versions are the saved checkpoints, logged with the transformers flavor (pyfunc too) and explicit
pip requirements (no torchvision: there is no CPU wheel of it here). A version is reused for the
same checkpoint (``spinflow.model_hash``). ``iter_k`` points at θk+1, ``champion`` at the iteration
a user keeps: :func:`choose_iteration` on the validation split (the report's verdict uses the
same rule).
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any

from spinflow.config import Params
from spinflow.nodes import ITERATION, Model
from spinflow.report import choose_iteration
from spinflow.tracking.lineage import context_tags, provenance_inputs, provenance_path
from spinflow.tracking.store import (
    TAG_ITERATION,
    TAG_KEY,
    TAG_MANAGED,
    TAG_MODEL_HASH,
    TAG_VERSION,
)

log = logging.getLogger(__name__)

CHAMPION = "champion"
VALIDATION_PREFIX = "val/"  # evaluation metrics of the validation split, as logged


REQUIREMENTS = ("torch", "transformers", "accelerate", "safetensors", "tokenizers")


def pip_requirements() -> list[str]:
    """Pinned requirements of a registered model; no torchvision (no CPU wheel exists here)."""
    pins = []
    for name in REQUIREMENTS:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        pins.append(f"{name}=={version.split('+', 1)[0]}")
    return pins


class Registry:
    """The registered model ``tracking.registered_model`` as one pipeline sees it."""

    def __init__(self, client, params: Params, key: str, experiment_id: str, commit: str | None):
        self.client = client
        self.params = params
        self.key = key
        self.experiment_id = experiment_id
        self.commit = commit
        self.name = params.tracking.registered_model

    # -- versions ----------------------------------------------------------------------------------

    def versions(self) -> list:
        from mlflow.exceptions import MlflowException

        name = self.name.replace("'", "\\'")
        versions, token = [], None
        try:
            while True:
                page = self.client.search_model_versions(
                    f"name = '{name}'", max_results=1000, page_token=token
                )
                versions.extend(page)
                token = page.token
                if not token:
                    return versions
        except MlflowException as exc:
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return []
            raise

    def version_by_hash(self, model_hash: str):
        matches = [v for v in self.versions() if v.tags.get(TAG_MODEL_HASH) == model_hash]
        return min(matches, key=lambda v: int(v.version)) if matches else None

    def tag_version(self, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)

    def register(self, run, model: Model, model_hash: str):
        """The version of ``model``'s checkpoint (logged when new), aliased ``iter_k``."""
        version = self.version_by_hash(model_hash)
        if version is None:
            version = self._log_model(run, model, model_hash)
        number = str(version.version)
        self.client.set_registered_model_alias(self.name, f"iter_{model.iteration}", number)
        if run.data.tags.get(TAG_VERSION) != number:
            self.client.set_tag(run.info.run_id, TAG_VERSION, number)
        return version

    def _log_model(self, run, model: Model, model_hash: str):
        import mlflow.transformers
        from mlflow.exceptions import MlflowException

        from spinflow.models import load_model, load_tokenizer

        directory = model.path.resolve()  # an absolute path is never taken for a hub repo id
        weights, tokenizer = load_model(directory), load_tokenizer(directory)
        tags = {
            **context_tags(self.key, self.commit),
            TAG_MANAGED: "true",
            TAG_ITERATION: str(model.iteration),
            TAG_MODEL_HASH: model_hash,
            "dvc.stage": model.stage,
            "spinflow.run_name": model.run_name or "",
        }
        lora = self.lora(model)
        if lora is not None:
            tags["spinflow.lora.base"] = lora["base_model_name_or_path"]
        # log_model files the model under the active experiment, not under its run's
        mlflow.set_experiment(experiment_id=self.experiment_id)
        quiet = logging.getLogger("mlflow.transformers")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # hub model card and license lookups for a local checkpoint
        try:
            info = mlflow.transformers.log_model(
                {"model": weights, "tokenizer": tokenizer},
                name=model.name,
                task="text-generation",
                pip_requirements=pip_requirements(),
                model_config={"max_new_tokens": self.params.eval.max_new_tokens},
                metadata={"spinflow": {k: v for k, v in tags.items() if k.startswith("spinflow")}},
                run_id=run.info.run_id,
            )
        finally:
            quiet.setLevel(level)
        try:
            self.client.create_registered_model(
                self.name,
                description="SPIN iterations logged by spinflow; aliases iter_k and champion.",
            )
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        return self.client.create_model_version(
            self.name,
            source=info.model_uri,
            run_id=run.info.run_id,
            model_id=info.model_id,
            tags=tags,
            description=(
                f"θ{model.index}: result of SPIN iteration {model.iteration} "
                f"(pipeline {self.key}, stage {model.stage})"
            ),
        )

    def lora(self, model: Model) -> dict[str, Any] | None:
        """θ is saved with its LoRA adapter merged; record the adapter's config and its base."""
        if model.role == ITERATION:
            optim = self.params.train_for(model.iteration)[0]
        else:
            optim = self.params.sft
        if not optim.lora.enabled:
            return None
        base_hash = provenance_inputs(model.path).get("model")
        base = str(provenance_path(model.path, "model") or "")
        version = self.version_by_hash(base_hash) if base_hash else None
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": (
                f"models:/{self.name}/{version.version}" if version else base
            ),
            "base_model_path": base,
            "base_model_hash": base_hash,
            "r": optim.lora.r,
            "lora_alpha": optim.lora.alpha,
            "lora_dropout": optim.lora.dropout,
            "target_modules": list(optim.lora.target_modules),
            "merged": True,
        }

    # -- aliases and cleanup -----------------------------------------------------------------------

    def update_champion(self, runs: dict[int, Any]) -> tuple[int, str] | None:
        """Point ``champion`` at the iteration run (by k) :func:`choose_iteration` picks on the
        validation split's ``tracking.champion_metric``; returns (k, version)."""
        tracking = self.params.tracking
        metric = f"eval/{VALIDATION_PREFIX}{tracking.champion_metric}"
        values: dict[int, float | None] = {}
        versions: dict[int, str] = {}
        evaluated: set[str] = set()
        for k, run in runs.items():
            evaluated.update(key for key in run.data.metrics if key.startswith("eval/"))
            version = run.data.tags.get(TAG_VERSION)
            if version is not None:
                versions[k] = version
                values[k] = run.data.metrics.get(metric)
        chosen = choose_iteration(values, tracking.champion_mode)
        if chosen is None:
            if evaluated:
                choices = sorted(
                    m.removeprefix(f"eval/{VALIDATION_PREFIX}")
                    for m in evaluated
                    if m.startswith(f"eval/{VALIDATION_PREFIX}")
                )
                log.warning(
                    "no iteration has %s, so no %s alias; the champion is chosen on the "
                    "validation split (data.num_val > 0), and tracking.champion_metric can be: %s",
                    metric,
                    CHAMPION,
                    ", ".join(choices) or "none (no validation split)",
                )
            return None
        version = versions[chosen]
        aliases = self.client.get_registered_model(self.name).aliases or {}
        if str(aliases.get(CHAMPION)) != version:
            self.client.set_registered_model_alias(self.name, CHAMPION, version)
            log.info(
                "champion: iter_%d (version %s, %s = %s)", chosen, version, metric, values[chosen]
            )
        return chosen, version

    def cleanup(self) -> None:
        """Delete this pipeline's versions that a re-run replaced and nothing refers to."""
        from mlflow.exceptions import MlflowException

        versions = self.versions()
        if not versions:
            return
        aliases = self.client.get_registered_model(self.name).aliases or {}
        aliased = {str(v) for v in aliases.values()}
        for version in versions:
            tags = version.tags
            if (
                tags.get(TAG_MANAGED) != "true"
                or tags.get(TAG_KEY) != self.key
                or str(version.version) in aliased
            ):
                continue
            try:
                source_run = self.client.get_run(version.run_id) if version.run_id else None
            except MlflowException:
                source_run = None
            if source_run is not None and source_run.info.lifecycle_stage != "deleted":
                continue
            referring = self.client.search_runs(
                [self.experiment_id],
                f"tags.`{TAG_VERSION}` = '{version.version}'",
                max_results=1,
            )
            if referring:
                continue
            self.client.delete_model_version(self.name, version.version)
            log.info("deleted superseded version %s of %s", version.version, self.name)
