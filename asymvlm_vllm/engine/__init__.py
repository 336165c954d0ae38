"""The vLLM glue: the only part of asymvlm-vllm that imports vllm, and only when used.

* :mod:`.plugin` — ``vllm serve MODEL --plugin asymvlm`` (the ``vllm.general_plugins``
  entry point) and :func:`~.plugin.asymvlm_engine_args` for ``vllm.LLM``.
* :mod:`.scheduler` — probe → decide → rewrite before KV blocks are allocated.
* :mod:`.runner`, :mod:`.worker` — decisions in the model runner; pruned embeddings.
* :mod:`.validation` — per-request ``vllm_xargs`` checked at the front end (HTTP 400).
* :mod:`.http` — the same check on the raw JSON (vLLM's request models coerce ``true`` to 1).
* :mod:`.metrics` — ``asymvlm_*`` Prometheus metrics on the server's ``/metrics``.
* :mod:`.protocol`, :mod:`.settings`, :mod:`.families` — the data they exchange.

Importing this package imports nothing from vllm.
"""
