"""Serving the hybrid with vLLM: only glue, no numerics of our own.

    serve/model.py   the vLLM model class (softmax layers on the paged KV cache, GDN layers on the
                     recurrent-state cache) and its explicit checkpoint-to-vLLM weight map
    serve/plugin.py  the `vllm.general_plugins` entry point that registers config and model in every
                     vLLM process
    serve/server.py  `hybrid serve`: vLLM's OpenAI-compatible server plus GET /v1/hybrid
    serve/cli.py     the `serve` subcommand's arguments (imports nothing heavy)
"""
