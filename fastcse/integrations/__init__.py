"""Adapters that put fastcse's fused loss inside other training frameworks.

Each adapter lives in its own submodule and imports its framework only when that submodule
is imported, so ``import fastcse`` (and this package) never needs the optional extras:

- ``fastcse.integrations.sentence_transformers``: ``InfoNCELoss``, a drop-in for
  sentence-transformers' (Cached)MultipleNegativesRankingLoss
  (``pip install fastcse[sentence-transformers]``).
"""
