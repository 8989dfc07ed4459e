"""Engine adapters: plug kvpool into the engines people run.

* :mod:`kvpool.integrations.vllm`: ``KVPoolConnector``, a vLLM v1 KV connector
  (``--kv-transfer-config '{"kv_connector": "KVPoolConnector",
  "kv_connector_module_path": "kvpool.integrations.vllm", ...}'``).
* :mod:`kvpool.integrations.sglang`: ``KVPoolStore``, an SGLang HiCache storage backend
  (``--hicache-storage-backend dynamic`` with ``module_path``/``class_name``).

Each adapter module imports its engine at import time (it subclasses the engine's own base
class), so this package imports neither: ``import kvpool`` never pulls vLLM or SGLang in.
Both key blocks with kvpool's identity (:mod:`kvpool.identity`), never with the engine's
process-seeded hashes, so any engine process on any host finds what another one published.
"""

__all__: list[str] = []
