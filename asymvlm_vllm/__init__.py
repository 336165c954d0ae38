"""AsymVLM for vLLM: content-adaptive vision-token pruning and generated-token KV eviction.

Rooms, by what they may import:

* ``asymvlm_vllm.core``    — the algorithm in plain torch (+ pydantic for configs). No vllm, no transformers.
* ``asymvlm_vllm.kernels`` — Triton kernels (torch + triton), with torch references in core.

Importing this package imports nothing heavy; import the room you need.
"""

__version__ = "0.1.0"
