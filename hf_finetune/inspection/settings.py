"""The settings of an inspection: `inspect: true` runs it before training; the rest say what it looks for."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_finetune.errors import UserError

EXCLUDABLE = ("leakage", "label_issues")

# Both chosen on a held-out pair set (benchmarks/inspect_data.py prints it): 200 validation digits, each against a
# copy of itself re-encoded as JPEG and resized from 32 to 34-36 px (what a leaked picture usually is), and against
# every other picture of train + validation (distinct pictures, some of which merely look alike). In the whitened
# space of the real EfficientNet-Lite0's features (duplicates.comparison_space) every copy scored >= 0.618, so
# 0.6 lets every copy through as a candidate (and 13 % of the originals' nearest distinct pictures with them); the
# grey thumbnails of the copies then correlate >= 0.994 with their originals, and at 0.99 one original in 200 had
# a distinct candidate passing both (its thumbnail 0.990). See the README, "Know your data".
DEFAULT_NEAR_DUPLICATE_THRESHOLD = 0.6
DEFAULT_PIXEL_SIMILARITY_THRESHOLD = 0.99


@dataclass
class InspectArguments:
    """What `hf-finetune inspect` (and `inspect: true` before training) looks for, and what it may drop."""

    inspect: bool = field(
        default=False,
        metadata={
            "help": "Before training, inspect the data (duplicates, leakage, likely label errors, picture "
            "statistics) from the cached features and write data_report.md / .json / PNG grids into output_dir."
        },
    )
    near_duplicate_threshold: float = field(
        default=DEFAULT_NEAR_DUPLICATE_THRESHOLD,
        metadata={
            "help": "Cosine similarity of the backbone features (PCA-whitened on train) from which two pictures are "
            "near-duplicate candidates, then checked pixel by pixel (chosen on a held-out pair set of re-encoded, "
            "resized copies; see the README)."
        },
    )
    pixel_similarity_threshold: float = field(
        default=DEFAULT_PIXEL_SIMILARITY_THRESHOLD,
        metadata={
            "help": "Correlation of the two pictures' 16x16 grey thumbnails from which a candidate pair counts as a "
            "near-duplicate (the same picture re-encoded or resized; different pictures of one thing fall below). "
            "0 turns the pixel check off: the feature cosine alone decides (then raise near_duplicate_threshold, "
            "e.g. to 0.8)."
        },
    )
    exclude: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Drop listed training pictures from training: `leakage` (training pictures that duplicate a "
            "validation / test picture), `label_issues` (likely label errors). Written to "
            "excluded_from_training.json and counted in the log."
        },
    )
    label_issue_folds: int = field(
        default=5,
        metadata={"help": "Cross-validation folds on train for the out-of-fold probabilities (cleanlab)."},
    )
    tiny_picture_side: int = field(
        default=32,
        metadata={"help": "Pictures whose shorter side is below this (pixels) are listed as tiny."},
    )
    max_shown: int = field(
        default=24,
        metadata={"help": "Pictures (or pairs) per PNG grid; the lists in the report are complete."},
    )

    def __post_init__(self):
        if not 0.0 < self.near_duplicate_threshold <= 1.0:
            raise UserError(
                f"near_duplicate_threshold={self.near_duplicate_threshold} must be a cosine similarity in (0, 1], "
                f"e.g. {DEFAULT_NEAR_DUPLICATE_THRESHOLD} (the default)."
            )
        if not 0.0 <= self.pixel_similarity_threshold <= 1.0:
            raise UserError(
                f"pixel_similarity_threshold={self.pixel_similarity_threshold} must be a correlation in [0, 1], e.g. "
                f"{DEFAULT_PIXEL_SIMILARITY_THRESHOLD} (the default), or 0 to decide on the features alone."
            )
        unknown = [value for value in self.exclude if value not in EXCLUDABLE]
        if unknown:
            raise UserError(
                f"exclude={self.exclude} names {unknown}, which the inspection does not list: use any of "
                f"{', '.join(EXCLUDABLE)} (e.g. `exclude: [leakage]`), or leave it empty to drop nothing."
            )
        if self.label_issue_folds < 2:
            raise UserError(
                f"label_issue_folds={self.label_issue_folds} must be at least 2: out-of-fold probabilities need "
                "each picture predicted by a classifier fitted without it (5 is usual)."
            )
        for name in ("tiny_picture_side", "max_shown"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be at least 1.")
