"""A phase body under ``torch.compile``: fullgraph first, and a loud fallback when it does not compile.

The fast step's phases (``rwp_fast.train.fast_step``) trace whole on every torch that setup.py accepts: the
tests hold them to that with ``fullgraph=True`` on 2.11 and 2.14. A torch we do not test or a model a user
brings may still break a graph. Then the run goes on rather than stopping at step 1:

1. ``fullgraph``: one graph per phase, a graph break is an error. Dynamo traces the whole frame before it
   runs any of it, so when tracing or the backend raises, nothing of the phase has run, and running it
   again at the next level repeats nothing. The backward of a phase that differentiates (the probe and
   training forwards) is compiled with its forward (``force_non_lazy_backward_lowering``): lazily, it would
   compile at the first ``.backward()`` in the host code, outside this call and after the forward ran.
   Hitting the recompile limit raises before anything runs too, and falls back the same way.
2. ``graph-breaks``: fullgraph off, and after a fallback Dynamo's ``suppress_errors`` on: Dynamo breaks the
   graph at what it cannot trace, and runs eagerly any frame that it cannot compile (it logs each such
   frame). The second half of the fallback is Dynamo's, frame by frame: a whole-phase retry could repeat a
   part that ran. A multi-process run starts here (``fullgraph=False``), without suppress_errors until a
   failure: a compile error there is raised, as any, never swallowed unannounced.

A failure during a CUDA graph capture is not a phase's: it is raised to the capture's own fallback
(``rwp_fast.train.graphs.run_captured``), which drops the graphs and goes on compiled.

The switch warns once per phase with the whole cause (the formatted exception chain), never only its first
line, and ``PhaseFunction.fallback`` keeps a one-line record for metrics.jsonl, bench rows and verify.
"""

import functools
import traceback
import warnings

import torch

from ..core import PhaseFallbackWarning

LEVELS = ("fullgraph", "graph-breaks", "eager")
# Raised by Dynamo or the backend before the compiled frame runs (FailOnRecompileLimitHit is no
# TorchDynamoException: fullgraph turns the recompile limit into an error).
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)


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
        if self.level == "eager":
            return self._fn(*args)
        with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
            if self.fallback is not None:
                with torch._dynamo.config.patch(suppress_errors=True):
                    return self._fn(*args)
            try:
                return self._fn(*args)
            except COMPILE_ERRORS as exc:  # tracing or the backend: nothing of the phase has run
                # with graph breaks a part may have run: no retry. In a capture: run_captured's failure.
                if self.level != "fullgraph" or (torch.cuda.is_available()
                                                 and torch.cuda.is_current_stream_capturing()):
                    raise
                self._fall_back(exc)
        return self(*args)

    def _fall_back(self, exc):
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        self.fallback = f"{self.name}: fullgraph failed ({type(exc).__name__}: {first}); graph breaks allowed"
        self.warn(f"phase {self.name!r} does not compile with fullgraph=True; it runs on with graph breaks "
                  f"allowed (Dynamo runs eagerly what it cannot compile). The whole cause:\n"
                  f"{exception_text(exc)}", PhaseFallbackWarning)
        self.level = "graph-breaks"
        self._fn = self._build(self.level)
