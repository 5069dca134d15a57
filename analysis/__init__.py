"""Tables and plots from finished MLflow runs (and, for hyperparameter importance, the Optuna
storage).

This package reads only what the stores hold. Of ``carrot`` it imports :mod:`carrot.contract`
alone (the names of tags, metrics and artifacts and the confusion formulas, on NumPy only),
never the training code, so a table can be rebuilt on a laptop from a copied ``mlruns/``::

    python -m analysis.tables --experiment carrot --out analysis/output
    python -m analysis.plots --experiment carrot --out analysis/output
"""
