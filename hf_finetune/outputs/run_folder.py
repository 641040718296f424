"""The output folder of a run: checked before any work, and opened once the run is known to start.

Both the training run (`hf_finetune.train.run`) and the probe run (`hf_finetune.probe.run`) use these, so that a
finished run is never trained over and a failing run leaves the folder as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hf_finetune.outputs import card, manifest


def prepare_output_dir(training_args) -> None:
    """Refuse to overwrite a finished run silently, and fail before any work when the folder is not writable.

    Nothing is removed here: a run removes what its predecessor wrote only once it is known to start
    (`start_output`), so that a run failing on its checkpoint, data or settings leaves the folder as it was.
    """
    from hf_finetune.errors import UserError

    output_dir = Path(training_args.output_dir)
    finished = manifest.finished_run(output_dir)
    if finished and not training_args.overwrite_output_dir:
        raise UserError(
            f"output_dir={output_dir} already holds a finished run ({manifest.ALL_RESULTS} with {finished}). "
            "Choose another output_dir, or set overwrite_output_dir: true to train again and replace it."
        )
    previous = manifest.read_manifest(output_dir) or {"entries": []}
    if (output_dir / card.CARD).is_file() and not finished and card.CARD not in previous["entries"]:
        raise UserError(
            f"output_dir={output_dir} holds a {card.CARD} that hf-finetune did not write, and a run writes its "
            "model card under that name. Choose another output_dir (e.g. --output_dir outputs/my_run) or move "
            "the file."
        )
    with training_args.main_process_first(desc="output directory"):
        # Checked without creating anything: a run that stops early (a bad id, bad data) leaves no folder.
        existing = next(p for p in (output_dir.absolute(), *output_dir.absolute().parents) if p.exists())
        problem = None
        if not existing.is_dir():
            problem = f"{existing} is a file, not a folder"
        elif existing == output_dir.absolute():
            try:
                with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
                    pass
            except OSError as err:
                problem = err.strerror or str(err)
        elif not os.access(existing, os.W_OK | os.X_OK):
            problem = f"{existing} is not writable"
        if problem:
            raise UserError(
                f"Cannot write to output_dir={output_dir} ({problem}). Choose a folder you can write to, e.g. "
                "--output_dir outputs/my_run."
            )


def start_output(training_args) -> manifest.RunOutput | None:
    """The run is known to start: replace the previous run's files (with `overwrite_output_dir`) and begin this
    run's manifest. Main process only writes; the others wait until it is done."""
    record = None
    with training_args.main_process_first(desc="replacing the previous run"):
        if training_args.should_save:
            record = manifest.RunOutput(training_args.output_dir)
            record.start(replace=training_args.overwrite_output_dir)
    return record
