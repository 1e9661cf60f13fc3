"""The DSPy tests' language model: the shipped toy server (hokusai.devtools.echo_lm), whose model name picks the
behaviour (instant, slow-<ms>, error, garbage, unformatted)."""

from hokusai.devtools.echo_lm import EchoLanguageModel as FakeLanguageModel
from hokusai.devtools.echo_lm import answer_for

__all__ = ["FakeLanguageModel", "answer_for"]
