"""``python -m ldm serve``: an A1111-compatible HTTP API (:mod:`ldm.serve.api`) and a web page (:mod:`ldm.serve.ui`)
in front of one generation thread (:mod:`ldm.serve.worker`), making images through generate.py's own code
(:mod:`ldm.serve.a1111` reads a request into its arguments). Needs the ``serve`` extra: ``pip install -e ".[serve]"``.
"""
