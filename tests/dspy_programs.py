"""A trusted Python program, as an operator names one in HOKUSAI_DSPY_TRUSTED_PROGRAMS."""

import dspy


class ShoutingSummary(dspy.Module):
    """Summarises a text, then shouts the summary: code around a predictor, which a declaration cannot express."""

    def __init__(self) -> None:
        super().__init__()
        self.summarize = dspy.Predict("text -> summary")

    async def aforward(self, text: str) -> dspy.Prediction:
        summary = (await self.summarize.acall(text=text)).summary
        return dspy.Prediction(summary=summary.upper())

    def forward(self, text: str) -> dspy.Prediction:
        return dspy.Prediction(summary=self.summarize(text=text).summary.upper())


NOT_A_PROGRAM = "just a string"
