"""The methods the pipeline runs, one folder each: sft, spin, lobass, autoif.

A method's folder, ``spinflow/methods/<name>/``, holds

- ``params.py``: its section of params.yaml (built from :mod:`spinflow.schema`), which
  :class:`spinflow.config.Params` lists under the method's name;
- ``graph.py``: ``declare(graph)``, which adds its models, evaluations and stages to the
  :class:`~spinflow.graph.Graph`;
- its stage functions, each run by the ``stages/<script>.py`` its stages name;
- ``report.py`` where it has one: ``section(graph, rows, test)``, what it adds to
  reports/results.md.

:mod:`spinflow.methods.registry` lists them. They build on the shared library (SFT and
preference-pair training, log-probs, engines, evaluation, data, tracking), which imports none of
them.
"""
