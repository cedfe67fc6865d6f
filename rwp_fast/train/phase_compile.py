"""A phase body under ``torch.compile``: fullgraph first, and a loud fallback when it does not compile.

The fast step's phases (``rwp_fast.train.fast_step``) trace whole on every torch that setup.py accepts: the
tests hold them to that with ``fullgraph=True`` on 2.11 and 2.14. A torch we do not test or a model a user
brings may still break a graph. Then the run goes on rather than stopping at step 1:

1. ``fullgraph``: one graph per phase, a graph break is an error. Dynamo traces the whole frame before it
   runs any of it, so when tracing or the backend raises, nothing of the phase has run, and running it
   again at the next level repeats nothing.
2. ``graph-breaks``: fullgraph off, and Dynamo's ``suppress_errors`` on: Dynamo breaks the graph at what it
   cannot trace, and runs eagerly any frame that it cannot compile (it logs each such frame). The second
   half of the fallback is Dynamo's, frame by frame: a whole-phase retry could repeat a part that ran.

The switch warns once per phase with the whole cause (the formatted exception chain), never only its first
line, and ``PhaseFunction.fallback`` keeps a one-line record for metrics.jsonl, bench rows and verify.
"""

import functools
import traceback
import warnings

import torch

LEVELS = ("fullgraph", "graph-breaks", "eager")


class PhaseFallbackWarning(RuntimeWarning):
    """A phase left fullgraph. The test suite turns it into an error (pyproject.toml), so that no compiled
    test passes on a fallback; the tests of the fallback itself expect it."""


def exception_text(exc):
    """The whole exception chain, traceback included, as one string (the cause and its context)."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


class PhaseFunction:
    """Callable phase body: compiled with fullgraph (``level`` 'fullgraph'), with graph breaks allowed
    ('graph-breaks'), or plain (``compile=False``: 'eager')."""

    def __init__(self, body, name, compile=True, mode="default", fullgraph=True, warn=None):
        self.body, self.name, self.mode = body, name, mode
        functools.update_wrapper(self, body)  # __name__, __doc__ of the body: what it runs, in tracebacks too
        self.warn = warn or (lambda message, category: warnings.warn(message, category, stacklevel=4))
        self.fallback = None  # one line once the phase left fullgraph
        self.level = "eager" if not compile else ("fullgraph" if fullgraph else "graph-breaks")
        self._fn = self._build(self.level)

    def _build(self, level):
        if level == "eager":
            return self.body
        return torch.compile(self.body, fullgraph=level == "fullgraph", mode=self.mode)

    def __call__(self, *args):
        if self.level == "graph-breaks":
            with torch._dynamo.config.patch(suppress_errors=True):
                return self._fn(*args)
        if self.level == "eager":
            return self._fn(*args)
        try:
            return self._fn(*args)
        except torch._dynamo.exc.TorchDynamoException as exc:  # tracing or the backend: nothing has run
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            self.fallback = f"{self.name}: fullgraph failed ({type(exc).__name__}: {first}); graph breaks allowed"
            self.warn(f"phase {self.name!r} does not compile with fullgraph=True; it runs on with graph breaks "
                      f"allowed (Dynamo runs eagerly what it cannot compile). The whole cause:\n"
                      f"{exception_text(exc)}", PhaseFallbackWarning)
            self.level = "graph-breaks"
            self._fn = self._build(self.level)
            return self(*args)
