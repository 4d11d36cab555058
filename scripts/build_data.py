"""Builds hlora's shipped data from real public sources, deterministically (run once; the output
is committed under python/hlora/experiments/data/files/ with a manifest of licences and checksums).

General text (stand-in for the Pile), public domain, from Debian packages:
  dict-jargon (The Jargon File 4.4.7), dict-devil (The Devil's Dictionary), cfi-en (a public-domain
  non-fiction book). Paragraphs are split train/val/test by a hash of their text, so the held-out
  general text is never trained on.
Domain multiple-choice tasks (stand-ins for SciQ, PiQA, MedMCQA), mechanically from PyPI packages:
  science  — mendeleev (MIT): element symbols, atomic numbers, series;
  physical — pint 0.25.3 (BSD): which physical quantity a unit measures;
  medical  — simple-icd-10-cm 1.5.0 (MIT; ICD-10-CM is a US-government work): which ICD-10 chapter a
             category of conditions belongs to.
  Distractors are other answers of the same kind; items whose question contains the answer are
  dropped; splits are disjoint by question.

    apt-get download dict-jargon dict-devil cfi-en   (done by this script when missing)
    pip install mendeleev pint==0.25.3 simple-icd-10-cm==1.5.0
    python scripts/build_data.py
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import html
import json
import os
import random
import re
import subprocess
import tempfile
from typing import Dict, List

from hlora._io import atomic_path, write_text_atomic

OUT = os.path.join(os.path.dirname(__file__), "..", "python", "hlora", "experiments", "data", "files")
DEBS = ["dict-jargon", "dict-devil", "cfi-en", "wordnet-base"]


def _bucket(text: str) -> float:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _extract_debs(folder: str) -> str:
    subprocess.run(["apt-get", "download", *DEBS], cwd=folder, check=True, capture_output=True)
    root = os.path.join(folder, "root")
    for deb in glob.glob(os.path.join(folder, "*.deb")):
        subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    return root


def _paragraphs(text: str) -> List[str]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        para = re.sub(r"[{}]", "", para)
        if len(para) >= 80 and not para.startswith("00-database") and "http" not in para:
            out.append(para)
    return out


def general_text(root: str) -> Dict[str, List[str]]:
    paras: List[str] = []
    for name in ("jargon", "devil"):
        with gzip.open(os.path.join(root, "usr/share/dictd", f"{name}.dict.dz")) as f:
            raw = f.read().decode("utf8", "replace")
        paras += _paragraphs(raw)
    for page in sorted(glob.glob(os.path.join(root, "usr/share/doc/cfi-en/html/ch*web.htm"))):
        with open(page, encoding="latin-1") as f:
            raw = f.read()
        raw = re.sub(r"<(p|br|h\d|div)[^>]*>", "\n\n", raw, flags=re.I)
        paras += _paragraphs(html.unescape(re.sub(r"<[^>]+>", " ", raw)))
    paras = sorted(set(paras))
    splits: Dict[str, List[str]] = {"train": [], "val": [], "test": []}
    for p in paras:
        b = _bucket(p)
        splits["train" if b < 0.8 else "val" if b < 0.9 else "test"].append(p)
    return splits


def _mcq(question: str, answer: str, pool: List[str], rng: random.Random, source: str) -> Dict:
    others = sorted({p for p in pool if p != answer})
    options = rng.sample(others, 3) + [answer]
    rng.shuffle(options)
    return {"question": question, "options": options, "answer": options.index(answer), "source": source}


def science(rng: random.Random) -> List[Dict]:
    from mendeleev.fetch import fetch_table

    table = fetch_table("elements")
    series_names = dict(zip(fetch_table("series")["id"], fetch_table("series")["name"]))
    names, symbols = list(table["name"]), list(table["symbol"])
    series = [series_names.get(i) for i in table["series_id"]]
    items = []
    for name, sym, num, ser in zip(names, symbols, table["atomic_number"], series):
        items.append(_mcq(f"What is the chemical symbol of {name.lower()}?", sym, symbols, rng, "mendeleev"))
        items.append(_mcq(f"Which element has the chemical symbol {sym}?", name, names, rng, "mendeleev"))
        items.append(_mcq(f"Which element has atomic number {int(num)}?", name, names, rng, "mendeleev"))
        if isinstance(ser, str) and ser:
            items.append(_mcq(f"To which group of elements does {name.lower()} belong?", ser.lower(),
                              [s.lower() for s in series if isinstance(s, str)], rng, "mendeleev"))
    return items


def physical(rng: random.Random) -> List[Dict]:
    import pint

    path = os.path.join(os.path.dirname(pint.__file__), "default_en.txt")
    section, heading, pairs = None, None, []
    for line in open(path, encoding="utf8"):
        line = line.rstrip()
        m = re.match(r"^####\s*(.+?)\s*####$", line)
        if m:
            section, heading = m.group(1), None
            continue
        if section != "UNITS":
            continue
        m = re.match(r"^# ([A-Z][A-Za-z ]+)$", line)
        if m:
            heading = None if m.group(1).startswith("Logaritmic") else m.group(1).strip().lower()
            continue
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
        if heading and m:
            unit = m.group(1).replace("_", " ")
            if len(unit) > 2:
                pairs.append((unit, heading))
    headings = sorted({h for _, h in pairs})
    return [_mcq(f"What physical quantity does the unit '{u}' measure?", h, headings, rng, "pint")
            for u, h in pairs if h.split()[0] not in u]


def medical(rng: random.Random) -> List[Dict]:
    import simple_icd_10_cm as cm

    chapters = {c: re.sub(r"\s*\([A-Z0-9\-]+\)$", "", cm.get_description(c)) for c in cm.get_all_codes()
                if cm.is_chapter(c)}
    pool = sorted(chapters.values())
    items = []
    for code in cm.get_all_codes():
        if not cm.is_category(code):
            continue
        chapter = chapters[cm.get_ancestors(code)[-1]]
        desc = cm.get_description(code)
        if chapter.lower() in desc.lower():
            continue
        items.append(_mcq(f"In which chapter of the ICD-10 classification is '{desc}'?", chapter, pool, rng,
                          "simple-icd-10-cm"))
    return items


def general_knowledge(root: str, rng: random.Random, min_count: int = 10) -> List[Dict]:
    """"Which word means '<definition>'?" (scored after "The word for '<definition>' is") for common
    English nouns, from WordNet 3.0 (Debian wordnet-base): each noun's most frequent sense (index.noun
    lists senses by frequency) when the sense-tagged corpus counts it at least ``min_count`` times
    (cntlist.rev); distractors are other such nouns, never a synonym of the answer (another word of
    its synset)."""
    folder = os.path.join(root, "usr/share/wordnet")
    counts: Dict[str, int] = {}
    with open(os.path.join(folder, "cntlist.rev"), encoding="latin-1") as f:
        for line in f:
            key, sense, count = line.split()
            lemma, ss_type = key.split("%")[0], key.split("%")[1][0]
            if ss_type == "1" and sense == "1":
                counts[lemma] = int(count)
    first_synset: Dict[str, str] = {}
    with open(os.path.join(folder, "index.noun"), encoding="latin-1") as f:
        for line in f:
            if line.startswith(" "):
                continue  # the licence header
            fields = line.split()
            lemma, synsets = fields[0], int(fields[2])
            if re.fullmatch(r"[a-z]{3,}", lemma) and counts.get(lemma, 0) >= min_count:
                first_synset[lemma] = fields[-synsets]
    wanted = set(first_synset.values())
    glosses: Dict[str, tuple] = {}
    with open(os.path.join(folder, "data.noun"), encoding="latin-1") as f:
        for line in f:
            if line[:8] in wanted:
                head, gloss = line.split(" | ", 1)
                fields = head.split()
                words = {fields[4 + 2 * i] for i in range(int(fields[3], 16))}
                definition = gloss.split('"')[0].strip().rstrip(";").strip()
                glosses[line[:8]] = (definition, words)
    # Proper nouns (index.noun lowercases them: "france") are not vocabulary.
    pool = sorted(lemma for lemma, synset in first_synset.items() if lemma in glosses[synset][1])
    items = []
    for lemma in pool:
        definition, words = glosses[first_synset[lemma]]
        synonyms = {w.lower() for w in words}
        if len(definition) < 12:
            continue
        others = [w for w in pool if w not in synonyms]
        options = rng.sample(others, 3) + [lemma]
        rng.shuffle(options)
        # Scored after the prose "prompt", not "Question: …\nAnswer:": training on the domain sets
        # teaches that frame and would raise this score (docs/experiments.md, "Fronts").
        items.append({"question": f"Which word means '{definition}'?", "prompt": f"The word for '{definition}' is",
                      "options": options, "answer": options.index(lemma), "source": "WordNet 3.0"})
    return items


def split_items(items: List[Dict], test: int, val: int) -> Dict[str, List[Dict]]:
    """Disjoint by question, without items whose question contains the answer; test first (as
    large as asked, where the source allows)."""
    seen, unique = set(), []
    for it in items:
        answer = it["options"][it["answer"]].lower()
        if re.search(r"\b" + re.escape(answer) + r"\b", it["question"].lower()):
            continue  # the question gives the answer away
        if it["question"] not in seen:
            seen.add(it["question"])
            unique.append(it)
    unique.sort(key=lambda it: _bucket(it["question"]))
    test = min(test, len(unique) // 2)
    val = min(val, (len(unique) - test) // 4)
    return {"test": unique[:test], "val": unique[test:test + val], "train": unique[test + val:]}


WORDNET_LICENCE = ("WordNet 3.0 (Debian wordnet-base), WordNet 3.0 licence: WordNet 3.0 Copyright 2006 by "
                   "Princeton University. All rights reserved. THIS SOFTWARE AND DATABASE IS PROVIDED \"AS IS\" "
                   "AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED.")


def _write_items(name: str, rows: List[Dict], manifest: Dict[str, Dict], licence: str) -> None:
    write_text_atomic(os.path.join(OUT, name), "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    manifest[name] = {"items": len(rows), "licence": licence}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("general_knowledge",),
                        help="build one set and update its manifest entries, leaving the others as they are")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    manifest: Dict[str, Dict] = {}
    if args.only:
        with open(os.path.join(OUT, "MANIFEST.json")) as f:
            manifest = json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        root = _extract_debs(tmp)
        items = general_knowledge(root, random.Random("hlora-general-knowledge"))
        # Evaluation only (forgetting beyond perplexity): no training split is shipped.
        split = split_items(items, 300, 100)
        for which in ("test", "val"):
            _write_items(f"general_knowledge_{which}.jsonl", split[which], manifest, WORDNET_LICENCE)
        for split_name, paras in ([] if args.only else general_text(root).items()):
            name = f"general_{split_name}.txt.gz"
            path = os.path.join(OUT, name)
            # The gzip header names the file: the final name, not the temporary one written.
            with atomic_path(path) as part, open(part, "wb") as raw, \
                    gzip.GzipFile(path, "wb", fileobj=raw, mtime=0) as f:
                f.write("\n\n".join(paras).encode())
            manifest[name] = {"paragraphs": len(paras), "licence": "public domain",
                              "sources": "Debian dict-jargon, dict-devil, cfi-en"}
    if args.only:
        _finish(manifest, [f"general_knowledge_{which}.jsonl" for which in ("test", "val")])
        return
    sizes = {"science": (200, 60), "physical": (120, 40), "medical": (600, 200)}
    builders = {"science": science, "physical": physical, "medical": medical}
    licences = {"science": "mendeleev (MIT)", "physical": "pint 0.25.3 (BSD-3-Clause)",
                "medical": "simple-icd-10-cm 1.5.0 (MIT); ICD-10-CM: US government work, public domain"}
    for domain, build in builders.items():
        items = build(random.Random(f"hlora-{domain}"))
        for split, rows in split_items(items, *sizes[domain]).items():
            _write_items(f"{domain}_{split}.jsonl", rows, manifest, licences[domain])
    _finish(manifest, list(manifest))


def _finish(manifest: Dict[str, Dict], written: List[str]) -> None:
    """Checksums of the files written, then the manifest (atomically)."""
    for name in written:
        with open(os.path.join(OUT, name), "rb") as f:
            manifest[name]["sha256"] = hashlib.sha256(f.read()).hexdigest()
    write_text_atomic(os.path.join(OUT, "MANIFEST.json"), json.dumps(manifest, indent=1, sort_keys=True))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "sha256"} for k, v in manifest.items()}, indent=1))


if __name__ == "__main__":
    main()
