"""Where outputs may go: never into their own inputs.

Training writes `config.yaml`, `nnUNetPlans.json` and `dataset.json` into its run directory, and
prediction writes `CASE.nii.gz` files into its output folder: a run directory inside the raw
dataset would replace the dataset's `dataset.json` (its description, licence and `numTraining`
lost), one inside the preprocessing cache the cache's plan, and a prediction folder equal to its
input folder would take one case's image for another's finished prediction. `check_apart`
refuses them before anything is written. Paths are compared resolved (symlinks followed), and a
folder that does not exist yet is compared by the path it will have.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from jaxmamba.errors import UserError


class OverlapError(UserError, ValueError):
    """An output folder equal to or inside one of its inputs."""


def within(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` is `folder` or inside it, symlinks resolved."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_apart(output: str | Path, output_name: str, inputs: Mapping[str, str | Path], *,
                error: type[UserError] = OverlapError, hint: str = "") -> None:
    """Refuse `output` (named `output_name`, e.g. `train.run_dir`) equal to or inside any of
    `inputs` (name -> folder), in one line naming both and saying what would be overwritten."""
    for name, folder in inputs.items():
        if folder and within(output, folder):
            where = "is" if Path(output).resolve() == Path(folder).resolve() else "is inside"
            raise error(f"{output_name} = {output} {where} {name} ({folder}): its files would "
                        f"overwrite the inputs there; give {output_name} a folder outside it"
                        + (f" ({hint})" if hint else ""))
