"""Evaluation: datasets in their standard layouts (``datasets``), the metrics (``metrics``) and a
run over a dataset with its command ``iseg eval`` (``run``). The method never imports this package."""
