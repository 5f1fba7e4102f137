"""CoLA-format test data, written by the tests themselves (no corpus is copied into the repository).

    python tests/cola_data.py /tmp/cola        # writes raw/in_domain_train.tsv, raw/in_domain_dev.tsv, ...

The files have the release's exact layout and counts: 4 tab-separated columns (source code, label,
the author's mark, sentence), no header, 8551 training rows (6023 acceptable), 527 in-domain dev
rows (365 acceptable) from the 17 training sources and 516 out-of-domain dev rows (354 acceptable)
from 6 other sources (one of 3 rows in each dev file). The release's quirks are reproduced: no newline after the last
out-of-domain row, one out-of-domain row whose mark is a single space, one unacceptable training
row with an empty mark, training sentences with '"', lower-case starts and non-ASCII characters,
and the marks *, ??, ?*, *?.

The sentences come from a small grammar: acceptable ones are grammatical; unacceptable ones break
agreement, case, word order or argument structure, so a model can learn the difference. The same
seed always writes the same bytes.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

TRAIN_SOURCES = ["gj04", "bc01", "ad03", "ks08", "r-67", "c-05", "b_82", "clc95", "m_02", "w_80", "cj99",
                 "rhl07", "sks13", "sgww85", "l-93", "d_98", "g_81"]
OOD_SOURCES = ["swb04", "s_97", "e_09", "ks15", "h_12", "t_00"]
COUNTS = {"in_domain_train.tsv": (8551, 6023), "in_domain_dev.tsv": (527, 365), "out_of_domain_dev.tsv": (516, 354)}

NOUNS = [("cat", "cats"), ("dog", "dogs"), ("student", "students"), ("teacher", "teachers"), ("child", "children"),
         ("farmer", "farmers"), ("sailor", "sailors"), ("poem", "poems"), ("book", "books"), ("doctor", "doctors"),
         ("river", "rivers"), ("letter", "letters"), ("bird", "birds"), ("king", "kings"), ("chef", "chefs")]
NAMES = ["John", "Mary", "Kim", "Sandy", "Pat", "Chris", "Lee", "Robin", "Jean-Luc", "Zoë"]
TRANSITIVE = [("chases", "chase", "chased"), ("sees", "see", "saw"), ("likes", "like", "liked"),
              ("reads", "read", "read"), ("finds", "find", "found"), ("praises", "praise", "praised"),
              ("writes", "write", "wrote"), ("visits", "visit", "visited")]
INTRANSITIVE = [("sleeps", "sleep", "slept"), ("laughs", "laugh", "laughed"), ("arrives", "arrive", "arrived"),
                ("waits", "wait", "waited"), ("sings", "sing", "sang")]
ADVERBS = ["quickly", "often", "yesterday", "again", "quietly", "at noon", "in the garden", "without a word"]
ADJECTIVES = ["old", "happy", "tall", "clever", "tired", "young", "quiet"]
PRONOUNS = [("he", "him"), ("she", "her"), ("they", "them"), ("we", "us")]


class Grammar:
    def __init__(self, rng: random.Random) -> None:
        self.r = rng

    def np(self, plural: bool | None = None) -> tuple[str, bool]:
        r = self.r
        if r.random() < 0.2:
            return r.choice(NAMES), False
        plural = r.random() < 0.4 if plural is None else plural
        noun = r.choice(NOUNS)[1 if plural else 0]
        det = r.choice(["the", "some", "these"] if plural else ["the", "a", "this", "every"])
        if r.random() < 0.3:
            noun = f"{r.choice(ADJECTIVES)} {noun}"
        return f"{det} {noun}", plural

    def verb(self, kind: list[tuple[str, str, str]], plural: bool) -> str:
        s, p, past = self.r.choice(kind)
        return past if self.r.random() < 0.4 else (p if plural else s)

    def clause(self) -> list[str]:
        r = self.r
        subj, plural = self.np()
        if r.random() < 0.6:
            obj, _ = self.np()
            words = [subj, self.verb(TRANSITIVE, plural), obj]
        else:
            words = [subj, self.verb(INTRANSITIVE, plural)]
        if r.random() < 0.5:
            words.append(r.choice(ADVERBS))
        return words

    def good(self) -> str:
        r = self.r
        choice = r.random()
        if choice < 0.15:
            nom, _ = r.choice(PRONOUNS)
            _, acc = r.choice(PRONOUNS)
            words = [nom, self.r.choice(TRANSITIVE)[2], acc]
        elif choice < 0.3:
            words = [*self.clause(), "and", *self.clause()]
        elif choice < 0.4:
            obj, _ = self.np()
            return f"Who {r.choice(TRANSITIVE)[2]} {obj}?"
        elif choice < 0.5:
            head, plural = self.np()
            name = r.choice(NAMES)
            words = [head, "that", name, r.choice(TRANSITIVE)[2], self.verb(INTRANSITIVE, plural),
                     r.choice(ADVERBS)]
            if r.random() < 0.5:  # long sentences: the release goes up to ~40 words
                words += ["because", *self.clause(), "while", *self.clause()]
        else:
            words = self.clause()
        return sentence(words)

    def bad(self) -> str:
        r = self.r
        choice = r.random()
        if choice < 0.3:  # agreement
            subj, plural = self.np(plural=r.random() < 0.5)
            s, p, _ = r.choice(TRANSITIVE)
            obj, _ = self.np()
            words = [subj, s if plural else p, obj]
        elif choice < 0.5:  # case
            _, acc = r.choice(PRONOUNS)
            nom, _ = r.choice(PRONOUNS)
            words = [acc.capitalize(), r.choice(TRANSITIVE)[2], nom]
        elif choice < 0.7:  # a transitive verb without its object
            subj, plural = self.np()
            words = [subj, self.verb(TRANSITIVE, plural)]
            if r.random() < 0.5:
                words.append(r.choice(ADVERBS))
        else:  # word order
            words = " ".join(self.clause()).split()
            i = r.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        return sentence(words)


def sentence(words: list[str]) -> str:
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def rows(rng: random.Random, n: int, acceptable: int, sources: list[str]) -> list[list[str]]:
    g = Grammar(rng)
    labels = [1] * acceptable + [0] * (n - acceptable)
    rng.shuffle(labels)
    out = []
    for label in labels:
        mark = "" if label else rng.choices(["*", "??", "?*", "*?"], weights=[90, 4, 4, 2])[0]
        out.append([rng.choice(sources), str(label), mark, g.good() if label else g.bad()])
    return out


def write_cola(folder: Path, seed: int = 0) -> Path:
    """Write the three CoLA files under `folder`/raw/ (the release layout); return `folder`."""
    rng = random.Random(seed)
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    train = rows(rng, *COUNTS["in_domain_train.tsv"], TRAIN_SOURCES)
    # The release's quirks, in the training file: quotes, a lower-case start, non-ASCII text, and
    # an unacceptable row without a mark.
    first_ok = [i for i, r in enumerate(train) if r[1] == "1"]
    train[first_ok[3]][3] = 'The teacher said "wait" to the students.'
    train[first_ok[40]][3] = 'Kim called the poem "a river of words".'
    train[first_ok[5]][3] = "the sailors waited at noon."
    train[first_ok[6]][3] = "Zoë read the letter again – quietly…"
    first_bad = next(i for i, r in enumerate(train) if r[1] == "0")
    train[first_bad][2] = ""
    in_dev = rows(rng, *COUNTS["in_domain_dev.tsv"], TRAIN_SOURCES[:-1])
    ood = rows(rng, *COUNTS["out_of_domain_dev.tsv"], OOD_SOURCES[:-1])
    # Small sources, as in the release: a dev source with 3 rows, all of one class.
    for data, source in ((in_dev, TRAIN_SOURCES[-1]), (ood, OOD_SOURCES[-1])):
        for row in [r for r in data if r[1] == "1"][-3:]:
            row[0] = source
    ood_ok = next(i for i, r in enumerate(ood) if r[1] == "1")
    ood[ood_ok][2] = " "  # a single space in the mark column of an acceptable row
    for name, data, end in (("in_domain_train.tsv", train, "\n"), ("in_domain_dev.tsv", in_dev, "\n"),
                            ("out_of_domain_dev.tsv", ood, "")):  # no newline after the last OOD row
        text = "\n".join("\t".join(r) for r in data) + end
        (raw / name).write_bytes(text.encode("utf-8"))
    return folder


def sentences(folder: Path) -> list[str]:
    lines = (folder / "raw" / "in_domain_train.tsv").read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[3] for line in lines]


if __name__ == "__main__":
    print(write_cola(Path(sys.argv[1])))
