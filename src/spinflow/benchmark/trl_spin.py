"""TRL's DPOTrainer set up as SPIN, on spinflow's own tokens: what ``spinflow benchmark``
compares training speed against and what tests/test_trl_parity.py compares the loss, the
log-probs and one optimizer step against. TRL is a dev dependency (``pip install -e .[dev]``);
no stage imports this module.
"""

from __future__ import annotations

from pathlib import Path


def trl_dataset(examples):
    """spinflow's pairs as TRL's tokenised columns (chosen = real, rejected = generated)."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt_ids": e.real.input_ids[: e.real.prompt_length],
                "chosen_ids": e.real.input_ids[e.real.prompt_length :],
                "rejected_ids": e.generated.input_ids[e.generated.prompt_length :],
            }
            for e in examples
        ]
    )


def trl_spin_trainer(
    model,
    tokenizer,
    examples,
    optim,
    *,
    beta: float,
    loss: str,
    seed: int,
    out_dir: str | Path,
    precompute_ref_log_probs: bool = False,
    ref_model=None,
    max_steps: int = -1,
):
    """TRL's DPOTrainer as SPIN: sigmoid or hinge loss, chosen = real, rejected = generated.

    It is handed spinflow's token ids (its own tokenisation step is skipped), so both score
    exactly the same tokens; everything else (collation, reference model or precomputed
    reference log-probs, loss, optimizer step) is TRL's.
    """
    import torch
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    optimizers = {"adamw": "adamw_torch", "rmsprop": "rmsprop", "sgd": "sgd"}
    args = DPOConfig(
        output_dir=str(out_dir),
        beta=beta,
        loss_type=[loss],
        per_device_train_batch_size=optim.batch_size,
        gradient_accumulation_steps=optim.gradient_accumulation_steps,
        learning_rate=optim.learning_rate,
        lr_scheduler_type=optim.scheduler,
        warmup_steps=optim.warmup_ratio,
        weight_decay=optim.weight_decay,
        optim=optimizers[optim.optimizer],
        max_grad_norm=optim.max_grad_norm or 0.0,
        num_train_epochs=optim.epochs,
        max_steps=max_steps,
        max_length=None,
        precompute_ref_log_probs=precompute_ref_log_probs,
        bf16=optim.bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return PretokenizedDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=trl_dataset(examples),
        processing_class=tokenizer,
    )
