"""The one model-card builder: a run's README.md, built from data on `huggingface_hub.ModelCard`.

What the card says comes from data that the parts of a run contribute, never from editing a written card:

    content = ModelCardContent.for_run(output_dir, training_args, data_args, labels=names, results=metrics,
                                       base_model=checkpoint, sections=[report_section(report_files)])
    write_model_card(output_dir, content)            # README.md, rendered once from `content`
    add_card_section(output_dir, CardSection("Comparison with other ways to transfer", table))  # compare

The metadata (library_name, base_model, datasets, license, tags, pipeline_tag, model-index with the evaluation
results) is a `ModelCardData` with `EvalResult`s, so the Hub and `ModelCard.load` read it as they read their
own cards. `write_model_card` also keeps `content` as JSON beside the card (`CARD_DATA`, a hidden file, so it
is not published); `add_card_section` renders the card again from it with one section added or replaced.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_finetune.outputs.atomic import write_json, write_text_atomic

logger = logging.getLogger(__name__)

CARD = "README.md"
# What the card was rendered from (hidden: dot files are not published, see publish.UPLOAD_IGNORE_PATTERNS).
CARD_DATA = ".hf_finetune_card.json"
# The model-index lists these metrics of the evaluated split, in this order, when the results have them.
# Multi-label runs index mAP and the F1s (at 0.5 and at the validation-chosen thresholds) instead.
INDEXED_METRICS = ("accuracy", "macro_f1", "top5_accuracy", "mAP", "micro_f1", "macro_f1_at_thresholds")


@dataclass
class CardSection:
    """One `## title` section of the card body; a later section with the same title replaces it."""

    title: str
    body: str

    @classmethod
    def from_markdown(cls, markdown: str) -> CardSection | None:
        """A section from markdown that opens with its own `## title` line (None for empty markdown)."""
        text = markdown.strip()
        if not text:
            return None
        first, _, rest = text.partition("\n")
        if not first.startswith("## "):
            raise ValueError(f"a card section opens with a '## title' line, not {first!r}")
        return cls(first[3:].strip(), rest.strip())

    def markdown(self) -> str:
        return f"## {self.title}\n\n{self.body.strip()}\n"


@dataclass
class ModelCardContent:
    """Everything a model card says, as data.

    `base_model` and `dataset_name` are kept only when they are Hub ids (a local folder is named as "a local
    checkpoint" / "a local image dataset", so no path of this machine reaches the card). `usage` is the body of
    "How to use" (None: the `pipeline()` snippet; a timm output adds timm's own). `sections` follow it in order.
    """

    model_name: str
    labels: list[str]
    results: dict[str, Any]
    base_model: str | None = None
    dataset_name: str | None = None
    strategy: str = "full"
    strategy_settings: dict[str, Any] = field(default_factory=dict)
    repo_id: str | None = None
    license: str | None = None
    library_name: str = "transformers"
    pipeline_tag: str | None = "image-classification"
    usage: str | None = None
    sections: list[CardSection] = field(default_factory=list)

    def __post_init__(self):
        from hf_finetune.hub import is_hub_id

        self.base_model = self.base_model if is_hub_id(self.base_model) else None
        self.dataset_name = self.dataset_name if is_hub_id(self.dataset_name) else None
        self.labels = [str(label) for label in self.labels]
        self.strategy_settings = dict(self.strategy_settings or {})
        self.sections = [CardSection(**s) if isinstance(s, dict) else s for s in self.sections if s]

    @classmethod
    def for_run(cls, output_dir: str | os.PathLike, training_args, data_args, **fields) -> ModelCardContent:
        """The content of a run's card: what every run takes from its arguments (the name and repository from
        `hub_model_id`, else the folder's name; `license`; `dataset_name`; the saved model's library) + `fields`."""
        defaults = {
            "model_name": training_args.hub_model_id or Path(output_dir).name,
            "repo_id": training_args.hub_model_id,
            "license": training_args.license,
            "dataset_name": data_args.dataset_name,
            "library_name": model_library(output_dir),
        }
        return cls(**{**defaults, **fields})

    def with_section(self, section: CardSection) -> ModelCardContent:
        """A copy with `section` in place of the one of the same title (or after the others)."""
        titles = [s.title for s in self.sections]
        sections = list(self.sections)
        if section.title in titles:
            sections[titles.index(section.title)] = section
        else:
            sections.append(section)
        changed = copy.copy(self)  # not dataclasses.replace: the Hub names were decided when it was made
        changed.sections = sections
        return changed

    @property
    def load_from(self) -> str:
        return self.repo_id or "path/to/this/folder"


def non_default_settings(arguments) -> dict[str, Any]:
    """A dataclass's settings that differ from its defaults (the card's "Training" list)."""
    from hf_finetune.config_resolved import resolved_config

    return next(iter(resolved_config(arguments).values()), {})


def model_library(output_dir: str | os.PathLike) -> str:
    """The Hub `library_name` of the model saved in `output_dir`: `timm` for a timm checkpoint, else transformers.

    A timm checkpoint saved through TimmWrapper keeps the Hub's timm layout (plain timm keys, `architecture`
    and `pretrained_cfg` in config.json): timm loads it as well as transformers does, and the Hub files it
    under timm like the `timm/...` repos it came from.
    """
    try:
        config = json.loads((Path(output_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "transformers"
    return (
        "timm" if config.get("model_type") == "timm_wrapper" and "architecture" in config else "transformers"
    )


def card_data(content: ModelCardContent) -> Any:
    """The card's metadata: a `huggingface_hub.ModelCardData` with the evaluated split's `EvalResult`s."""
    from huggingface_hub import EvalResult, ModelCardData

    results = content.results
    split = "test" if any(f"test_{metric}" in results for metric in INDEXED_METRICS) else "eval"
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=content.dataset_name or "imagefolder",
            dataset_name=content.dataset_name or "a local image dataset",
            dataset_split="test" if split == "test" else "validation",
            metric_type=metric,
            metric_name=metric,
            metric_value=float(results[f"{split}_{metric}"]),
        )
        for metric in INDEXED_METRICS
        if f"{split}_{metric}" in results
    ]
    return ModelCardData(
        base_model=content.base_model,
        datasets=[content.dataset_name] if content.dataset_name else None,
        tags=["image-classification", "hf-finetune", f"strategy-{content.strategy}"],
        pipeline_tag=content.pipeline_tag,
        library_name=content.library_name,
        license=content.license,
        model_name=content.model_name,
        eval_results=eval_results or None,
    )


def results_table(results: dict[str, Any]) -> str:
    rows = ["| split | metric | value |", "|---|---|---|"]
    for key, value in results.items():
        for split in ("eval", "test"):
            if (
                key.startswith(f"{split}_")
                and isinstance(value, float)
                and not key.endswith(("_runtime", "per_second"))
            ) and key.endswith(("_loss", "accuracy", "_f1", "mAP", "_at_thresholds")):
                name = "validation" if split == "eval" else "test"
                rows.append(f"| {name} | {key[len(split) + 1 :]} | {value:.4f} |")
    return "\n".join(rows)


def pipeline_usage(load_from: str) -> str:
    return f"""```python
from transformers import pipeline

classifier = pipeline("image-classification", model="{load_from}")
classifier("picture.jpg")
```"""


def timm_usage(load_from: str, repo_id: str | None) -> str:
    """How timm itself loads a timm-layout output (the Hub's `hf-hub:` prefix, or `local-dir:`)."""
    source = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{load_from}"
    return f"""It is also a plain timm checkpoint:

```python
import timm

model = timm.create_model("{source}", pretrained=True)
```"""


def card_body(content: ModelCardContent) -> str:
    base = content.base_model
    source = f"[{base}](https://huggingface.co/{base})" if base else "a local checkpoint"
    dataset = content.dataset_name or "a local image dataset"
    settings = "".join(f"- `{key}`: `{value}`\n" for key, value in content.strategy_settings.items())
    usage = [content.usage.strip() if content.usage else pipeline_usage(content.load_from)]
    if content.library_name == "timm":
        usage.append(timm_usage(content.load_from, content.repo_id))
    sections = [
        CardSection("Results", results_table(content.results)),
        CardSection(
            "Training",
            "Transfer strategy and its settings:\n\n"
            + (settings or f"- `strategy`: `{content.strategy}` (defaults)\n"),
        ),
        CardSection("Labels", ", ".join(f"`{label}`" for label in content.labels)),
        CardSection("How to use", "\n\n".join(usage)),
        *content.sections,
    ]
    intro = (
        f"# {content.model_name}\n\nAn image classifier for {len(content.labels)} classes, fine-tuned from "
        f"{source} on {dataset} with\nhf-finetune (strategy: `{content.strategy}`).\n"
    )
    return "\n".join([intro, *(section.markdown() for section in sections)])


def model_card(content: ModelCardContent):
    """The `huggingface_hub.ModelCard` of `content` (its metadata is parsed back, so a bad field fails here)."""
    from huggingface_hub import ModelCard

    return ModelCard(f"---\n{card_data(content).to_yaml()}\n---\n\n{card_body(content)}")


def write_model_card(output_dir: str | os.PathLike, content: ModelCardContent) -> Path:
    """Render `content` into output_dir/README.md (and keep it beside the card for `add_card_section`)."""
    output_dir = Path(output_dir)
    text = str(model_card(content))
    write_json(output_dir / CARD_DATA, dataclasses.asdict(content))
    return write_text_atomic(output_dir / CARD, text)


def read_card_content(output_dir: str | os.PathLike) -> ModelCardContent | None:
    """The content the card in `output_dir` was rendered from; None when there is none or it cannot be read."""
    path = Path(output_dir) / CARD_DATA
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
        content = ModelCardContent(**fields)
    except (OSError, ValueError, TypeError):
        return None
    # Decided when the card was first written: a folder of that name where this process runs changes nothing.
    content.base_model, content.dataset_name = fields.get("base_model"), fields.get("dataset_name")
    return content


def add_card_section(output_dir: str | os.PathLike, section: CardSection) -> bool:
    """Render the card of `output_dir` again with `section` added (or replacing the one of its title).

    False, with a warning, when the folder holds no card content to render from (a card written by an older
    hf-finetune, or by hand): that card is left as it is.
    """
    content = read_card_content(output_dir)
    if content is None:
        logger.warning(
            "%s has no %s (its card was not written by this version of hf-finetune), so its card does not get "
            "the section %r.",
            output_dir,
            CARD_DATA,
            section.title,
        )
        return False
    write_model_card(output_dir, content.with_section(section))
    return True
