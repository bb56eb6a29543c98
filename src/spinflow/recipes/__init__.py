"""Recipes: one module per method, holding that method's stage functions and wiring.

- :mod:`~spinflow.recipes.prepare`: the base model and the data splits every method starts from;
- :mod:`~spinflow.recipes.sft`: θ0 (supervised fine-tuning) and the SFT-extra baseline;
- :mod:`~spinflow.recipes.spin`: self-play fine-tuning: pairs, mixing, the reference pass, the
  loss wiring, and the generate/train stages;
- :mod:`~spinflow.recipes.evaluate`: held-out evaluation of any model, and the report.

Recipes call the shared library (training loop, models, chat format, generation, losses, data,
verifiers) and read paths from :mod:`spinflow.graph`; the library knows nothing of recipes.
A stage function takes the validated params and the keyword arguments its graph stage declares.
"""
