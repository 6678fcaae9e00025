"""Serving a VM with no FM in the loop: the FM's daily job appends codes to an online timeline
store; at request time the VM reads the user's last L codes and scores the candidates.

* `bundle`: `loopfm export` (a trained VM as a torch.export program + vocabularies + specs) and
  `Bundle`, its loader.
* `store`: `TimelineStore` and its backends (``sqlite:PATH``, ``redis://HOST:PORT/DB``).
* `timelines`: filling a store from a run (`load` the built timelines, `append` a new day).
* `scorer`: `Scorer.score(request)`: raw values -> ids -> store read -> the exported VM.
* `server`: FastAPI app (``GET /health``, ``POST /score``). `check`: `serve-check`.
"""
