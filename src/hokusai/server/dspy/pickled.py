"""Programs saved as pickles (mlflow.dspy models), refused unless the operator allows them.

Unpickling runs whatever code the pickle holds, in the service's process, with its database, its MLflow credentials
and its LM key at hand: anyone with a `write` key could take the service over by registering one. A declared
program is data (a signature, instructions, demos) and cannot do that, so pickles are off by default and
HOKUSAI_DSPY_ALLOW_PICKLED=true is for deployments where every writer is trusted with the server itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hokusai.server.errors import InvalidRequest, Unprocessable

PICKLES_REFUSED = (
    "Pickled DSPy programs are refused: loading one runs whatever code the pickle holds, inside the service. "
    "Declare the program instead (module, signature, instructions, demos), or have an operator set "
    "HOKUSAI_DSPY_ALLOW_PICKLED=true"
)


class PickledProgramsRefused(InvalidRequest):
    def __init__(self) -> None:
        super().__init__(PICKLES_REFUSED)


def load_pickled(directory: Path) -> Any:
    """Blocking (worker thread): the DSPy module of an mlflow.dspy model's files."""
    import cloudpickle
    import dspy
    import yaml

    try:
        flavor = yaml.safe_load((directory / "MLmodel").read_text())["flavors"]["dspy"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        raise Unprocessable("This model is not an mlflow.dspy model (no dspy flavor in its MLmodel)") from None
    model_path = directory / flavor.get("model_path", "model")
    if model_path.suffix == ".pkl":
        with model_path.open("rb") as source:
            program = cloudpickle.load(source).model  # mlflow.dspy pickles a wrapper around the program
    else:
        program = dspy.load(str(model_path), allow_pickle=True)
    if not isinstance(program, dspy.Module):
        raise Unprocessable("The pickled object is not a DSPy module")
    return program
