"""Write the demo datasets: data/demo/ (catalogue lines) and data/region/ (a one-word, 3-class short-answer task).

    python scripts/make_demo_data.py          # rewrites data/demo/*.jsonl and data/region/*.jsonl deterministically

The task: turn a loosely written person record, whose fields come in any order and with varying
separators, into one fixed catalogue line, "Surname, Given (City, Year)". A base model cannot guess
the exact target format zero-shot, the answer can be scored by exact match, and a LoRA adapter learns it in a
few dozen steps. Records of the test split share no (given, surname) pair with train or val.

It also writes the preference demo (data/demo/pref_{train,val,test}.jsonl, for `make dpo`; 160 training pairs from the
first training records): the same records and prompts, where ``rejected`` is the SFT demo's catalogue line and ``chosen`` the new house style
"Surname, Given (City, b. Year)". The held-out pairs are the SFT test split's records, so they are split by record.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

GIVEN = """Alice Bruno Chiara Daniel Elena Farid Greta Hugo Ines Jonas Kira Lars Maya Nadia Oscar Paula Quentin Rosa
Samir Tessa Ugo Vera Walter Xenia Yusuf Zoe Amara Boris Carmen Dmitri Emil Fatima Gustav Hanna Ivan Julia Kenji Lina
Marco Nora Omar Petra Rafael Selma Tomas Ulla Viktor Wanda Yara Anton Beatriz Cyril Dalia Enzo Freya Goran Helga
Isak Jana""".split()
SURNAME = """Moreau Novak Rossi Schmidt Garcia Jansen Kowalski Silva Dubois Lindqvist Petrov Costa Bauer Haddad Ferreira
Nakamura Olsen Romano Weber Almeida Berg Conti Duval Eriksen Fischer Grimaldi Horvat Ivanova Jovanovic Keller Larsen
Marino Nilsen Okafor Pereira Quint Richter Santos Toth Urban Vidal Wagner Yilmaz Zeller Andersen Brandt Castillo
Dalton Esposito Fontaine""".split()
CITY = """Lyon Porto Turin Graz Gdansk Utrecht Bergen Tartu Leipzig Seville Bruges Krakow Malmo Basel Riga Split Bilbao
Ghent Aarhus Brno Genoa Nantes Vigo Cork Linz""".split()

# Several surface forms per field, so the model must parse rather than copy a fixed layout.
FIELD_FORMS = {
    "name": ["name={g} {s}", "name: {g} {s}", "full name = {g} {s}", "person: {g} {s}"],
    "born": ["born={y}", "born: {y}", "year of birth = {y}", "b. {y}"],
    "city": ["city={c}", "city: {c}", "lives in {c}", "home = {c}"],
}
SEPARATORS = ["; ", " | ", ", ", " / "]
INSTRUCTIONS = [
    "Format this record as a catalogue line:",
    "Catalogue line for this record:",
    "Rewrite as a catalogue entry:",
]


def make_example(rng: random.Random, given: str, surname: str) -> dict:
    year, city = rng.randint(1931, 2009), rng.choice(CITY)
    parts = [rng.choice(FIELD_FORMS[f]).format(g=given, s=surname, y=year, c=city) for f in FIELD_FORMS]
    rng.shuffle(parts)
    prompt = f"{rng.choice(INSTRUCTIONS)} {rng.choice(SEPARATORS).join(parts)}"
    answer = f"{surname}, {given} ({city}, {year})"
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def build(seed: int, n_train: int, n_val: int, n_test: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    pairs = [(g, s) for g in GIVEN for s in SURNAME]
    rng.shuffle(pairs)
    # Disjoint name pairs per split: the test split checks the format, not memorised people.
    cut_test, cut_val = n_test, n_test + n_val
    pools = {"test": pairs[:cut_test], "val": pairs[cut_test:cut_val], "train": pairs[cut_val:]}
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    return {
        split: [make_example(rng, *pools[split][i % len(pools[split])]) for i in range(sizes[split])]
        for split in ("train", "val", "test")
    }


# The short-answer task (issue 24): the same kind of record, classified by the part of Europe its city lies in.
# One-word answers, 3 balanced classes, 8 cities each; test records share no (given, surname) pair with train.
REGIONS = {
    "north": "Bergen Tartu Malmo Riga Aarhus Oulu Tromso Uppsala".split(),
    "south": "Seville Porto Genoa Split Naples Valencia Palermo Malaga".split(),
    "central": "Graz Leipzig Basel Brno Linz Krakow Dresden Salzburg".split(),
}
QUESTIONS = [
    "Which part of Europe does this person live in: north, south or central?",
    "Region of the home city (north, south or central)?",
    "Classify the record by region: north, south or central.",
]


def make_region_example(rng: random.Random, given: str, surname: str, region: str) -> tuple[str, str]:
    year, city = rng.randint(1931, 2009), rng.choice(REGIONS[region])
    parts = [rng.choice(FIELD_FORMS[f]).format(g=given, s=surname, y=year, c=city) for f in FIELD_FORMS]
    rng.shuffle(parts)
    return f"{rng.choice(QUESTIONS)}\n{rng.choice(SEPARATORS).join(parts)}\nAnswer:", region


def build_region(seed: int, n_train: int, n_test: int) -> dict[str, list[tuple[str, str]]]:
    """(prompt, answer) rows per split; classes balanced (round robin, then shuffled)."""
    rng = random.Random(seed)
    pairs = [(g, s) for g in GIVEN for s in SURNAME]
    rng.shuffle(pairs)
    pools = {"test": pairs[:n_test], "train": pairs[n_test:]}
    labels = list(REGIONS)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [make_region_example(rng, *pools[split][i % len(pools[split])], labels[i % 3]) for i in range(n)]
        rng.shuffle(rows)
        out[split] = rows
    return out


def write_both_forms(out: Path, split: str, rows: list[tuple[str, str]]) -> None:
    """(prompt, answer) rows twice: chat (``split.jsonl``, ``messages``) and TRL's plain ``prompt``/``completion``
    (``split_pc.jsonl``, the completion with its leading space, as raw text concatenates them)."""
    chat = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]} for p, a in rows]
    plain = [{"prompt": p, "completion": f" {a}"} for p, a in rows]
    for name, data in ((f"{split}.jsonl", chat), (f"{split}_pc.jsonl", plain)):
        with open(out / name, "w", encoding="utf-8") as f:
            for row in data:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(data):4d} rows to {out / name}")


def write_region(out: Path, seed: int, n_train: int, n_test: int) -> None:
    """The region task in both forms (write_both_forms)."""
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in build_region(seed, n_train, n_test).items():
        write_both_forms(out, split, rows)


def new_style(answer: str) -> str:
    """The house-style change: "Surname, Given (City, Year)" -> "Surname, Given (City, b. Year)"."""
    head, _, year = answer[:-1].rpartition(", ")
    return f"{head}, b. {year})"


def preference_rows(rows: list[dict]) -> list[dict]:
    """One pair per SFT row: the same prompt, chosen in the new style, rejected in the SFT demo's style."""
    out = []
    for row in rows:
        prompt, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        out.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": new_style(answer)}],
                "rejected": [{"role": "assistant", "content": answer}],
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "demo"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train", type=int, default=480)
    ap.add_argument("--val", type=int, default=40)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--region-out", default=str(Path(__file__).resolve().parents[1] / "data" / "region"))
    ap.add_argument("--region-train", type=int, default=405)
    ap.add_argument("--region-test", type=int, default=90)
    ap.add_argument("--pref-train", type=int, default=160, help="preference pairs from the first train records")
    args = ap.parse_args()
    write_region(Path(args.region_out), args.seed, args.region_train, args.region_test)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in build(args.seed, args.train, args.val, args.test).items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows):4d} rows to {out / f'{split}.jsonl'}")
        pairs = preference_rows(rows[: args.pref_train] if split == "train" else rows)
        with open(out / f"pref_{split}.jsonl", "w", encoding="utf-8") as f:
            for row in pairs:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(pairs):4d} pairs to {out / f'pref_{split}.jsonl'}")


if __name__ == "__main__":
    main()
