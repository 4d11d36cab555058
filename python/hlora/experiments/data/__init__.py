"""Data for the experiments: a general-text corpus (stand-in for the Pile) and three domain
multiple-choice tasks (stand-ins for SciQ, PiQA and MedMCQA), built by
``scripts/build_data.py`` from real public sources and shipped with the package (licences and
checksums in ``files/MANIFEST.json``); plus loaders for the paper's hub datasets by name.

MCQ items are dicts ``{"question": str, "options": [str, ...], "answer": int}`` — the JSONL
schema ``hlora evaluate --mcq FILE`` reads (one item per line) — with an optional ``"prompt"``: the
text each option is scored after, in place of ``Question: <question>\nAnswer:``.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Dict, Iterable, List, Optional

from hlora._io import read_text

FILES = os.path.join(os.path.dirname(__file__), "files")
DOMAINS = ("medical", "science", "physical")
SPLITS = ("train", "val", "test")
#: The paper's hub datasets and our offline stand-ins.
HUB = {"pile": "monology/pile-uncopyrighted", "sciq": "allenai/sciq", "piqa": "ybisk/piqa",
       "medmcqa": "openlifescienceai/medmcqa"}
STAND_IN = {"sciq": "science", "piqa": "physical", "medmcqa": "medical"}

MCQItem = Dict[str, object]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def general_text(split: str = "train") -> str:
    """The shipped general corpus (public-domain prose); ``test`` is the held-out text for
    perplexity, never trained on."""
    _check_split(split)
    with gzip.open(os.path.join(FILES, f"general_{split}.txt.gz"), "rt", encoding="utf8") as f:
        return f.read()


def validate_item(item: MCQItem, where: str = "item") -> MCQItem:
    if not isinstance(item, dict) or not isinstance(item.get("question"), str):
        raise ValueError(f"{where}: expected an object with a string 'question'")
    options = item.get("options")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise ValueError(f"{where}: 'options' must be a list of at least two strings")
    if "prompt" in item and not isinstance(item["prompt"], str):
        raise ValueError(f"{where}: 'prompt', where given, must be a string")
    answer = item.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):  # true is not 1
        raise ValueError(f"{where}: 'answer' must be the index of the correct option (0..{len(options) - 1})")
    return item


def load_mcq_file(path: str) -> List[MCQItem]:
    """Items from a JSONL file of ``{"question", "options", "answer"}`` objects."""
    items = []
    # Split on "\n" only: str.splitlines() would also break at a U+2028 inside a JSON string.
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from err
            items.append(validate_item(row, f"{path}:{n}"))
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def mcq(domain: str, split: str = "test") -> List[MCQItem]:
    """A shipped domain task: ``medical``, ``science`` or ``physical``."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    _check_split(split)
    return load_mcq_file(os.path.join(FILES, f"{domain}_{split}.jsonl"))


def general_knowledge(split: str = "test") -> List[MCQItem]:
    """Common English nouns from their WordNet definitions: a second measure of forgetting beside
    general perplexity, for evaluation only (``test`` and ``val``; nothing trains on it). Each word
    is scored in plain prose ("The word for '…' is"), not the domain sets' ``Question:/Answer:``
    frame, which domain training teaches (docs/experiments.md, "Fronts")."""
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val' (the general-knowledge set has no training split), "
                         f"got {split!r}")
    return load_mcq_file(os.path.join(FILES, f"general_knowledge_{split}.jsonl"))


def training_text(item: MCQItem) -> tuple:
    """(prompt, answer) for fine-tuning: the question, then the correct answer (loss on the answer)."""
    return prompt(item), " " + str(item["options"][item["answer"]])


def prompt(item: MCQItem) -> str:
    """The text an item's options are scored after (and trained after): its own ``"prompt"`` where
    it has one, else ``Question: <question>\nAnswer:``."""
    if "prompt" in item:
        return str(item["prompt"])
    return f"Question: {item['question']}\nAnswer:"


# ---- the paper's datasets, by name (need internet or local files of the same schema) ----

def from_sciq(row: Dict) -> MCQItem:
    options = [row["correct_answer"], row["distractor1"], row["distractor2"], row["distractor3"]]
    return validate_item({"question": row["question"], "options": options, "answer": 0})


def _labelled(answer: object, name: str) -> int:
    """The hubs mark an unlabeled item (PiQA's and MedMCQA's test splits) with -1."""
    if int(answer) == -1:
        raise ValueError(f"{name} items here have no answer (-1): the hub's test split of {name} is unlabeled; "
                         "use the validation split")
    return int(answer)


def from_piqa(row: Dict) -> MCQItem:
    return validate_item({"question": row["goal"], "options": [row["sol1"], row["sol2"]],
                          "answer": _labelled(row["label"], "piqa")})


def from_medmcqa(row: Dict, cop_base: int = 0) -> MCQItem:
    """``cop`` counts from 0 on the hub (a class label) and from 1 in the original release's files."""
    options = [row["opa"], row["opb"], row["opc"], row["opd"]]
    return validate_item({"question": row["question"], "options": options,
                          "answer": _labelled(row["cop"], "medmcqa") - cop_base})


CONVERTERS = {"sciq": from_sciq, "piqa": from_piqa, "medmcqa": from_medmcqa}


def medmcqa_cop_base(rows: List[Dict], where: str) -> int:
    """Whether a local MedMCQA file counts ``cop`` from 0 (a ``datasets`` export) or from 1 (the
    original release: "cop: correct option, i.e. 1, 2, 3, 4"), told by the values it holds: read
    the wrong way, every answer would be shifted by one option without an error."""
    values = {_labelled(row["cop"], "medmcqa") for row in rows}
    if 0 in values and 4 in values:
        raise ValueError(f"{where}: 'cop' takes both 0 and 4, so it counts neither from 0 nor from 1")
    if 4 in values:
        return 1
    if 0 in values:
        return 0
    raise ValueError(f"{where}: 'cop' is never 0 or 4, so it may count from 0 (a datasets export) or from 1 "
                     "(the original release); say which with cop_base=0 or cop_base=1")


def _rows(path: str) -> List[Dict]:
    """A JSON array (or ``{"data": [...]}``) or JSON lines — whatever the extension says: the
    original MedMCQA release ships JSON lines as ``.json``."""
    text = read_text(path)
    if not path.endswith(".jsonl"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            pass  # not one JSON document: JSON lines
        else:
            return data if isinstance(data, list) else data["data"]
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # (not splitlines(): see load_mcq_file)
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from err
    return rows


def _hub_rows(name: str, split: str, path: Optional[str]) -> Iterable[Dict]:
    if path is not None:
        return _rows(path)
    try:
        import datasets  # noqa: PLC0415
    except ImportError as err:
        raise ImportError(f"loading {HUB[name]} from the hub needs `pip install datasets` and internet; "
                          f"or pass path= to a local JSON/JSONL file of the same schema") from err
    return datasets.load_dataset(HUB[name], split={"val": "validation"}.get(split, split))


def hub_mcq(name: str, split: str = "validation", path: Optional[str] = None,
            cop_base: Optional[int] = None) -> List[MCQItem]:
    """SciQ / PiQA / MedMCQA items, from the hub or from a local file of the same schema (a JSON
    array or JSON lines). MedMCQA's ``cop`` counts from 0 on the hub; a local file's is told from
    its values (1..4: the original release) unless ``cop_base`` (0 or 1) says."""
    if name not in CONVERTERS:
        raise ValueError(f"name must be one of {sorted(CONVERTERS)}, got {name!r}")
    if cop_base not in (None, 0, 1) or isinstance(cop_base, bool):
        raise ValueError(f"cop_base must be 0 or 1 (or None: told from the file), got {cop_base!r}")
    rows = list(_hub_rows(name, split, path))
    if name != "medmcqa":
        return [CONVERTERS[name](row) for row in rows]
    if cop_base is None:
        cop_base = 0 if path is None else medmcqa_cop_base(rows, path)
    return [from_medmcqa(row, cop_base) for row in rows]


def hub_text(name: str = "pile", split: str = "train", path: Optional[str] = None, limit: Optional[int] = None) -> str:
    """General text from the Pile (field ``text``), from the hub or a local file of that schema."""
    if name != "pile":
        raise ValueError(f"general text source must be 'pile', got {name!r}")
    texts = []
    for row in _hub_rows(name, split, path):
        texts.append(row["text"])
        if limit and len(texts) >= limit:
            break
    return "\n\n".join(texts)
