"""The stages every pipeline shares, whichever methods it runs.

- :mod:`~spinflow.recipes.prepare`: the base model and the data splits every method starts from;
- :mod:`~spinflow.recipes.evaluate`: held-out evaluation of any model on the test and validation
  splits.

The methods' own stages live in their folders (:mod:`spinflow.methods`); the report stage is
:mod:`spinflow.report`. A stage function takes the validated params and the keyword arguments its
graph stage declares.
"""
