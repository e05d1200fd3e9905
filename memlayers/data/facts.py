"""Synthetic biographies: a closed world of invented people and their facts, for measuring memory.

Everything is generated offline from ``FactsConfig.seed`` (no downloads, no model): the same config
gives the same people, documents, tokenizer and batches on every machine.

The world
    ``people`` persons with unique two-word names ("Vadoru Mika"), built from syllables. Each person
    has six attributes (``ATTRIBUTES``); each attribute has ``choices`` possible values, generated
    from the seed, and every value is used equally often (a shuffled round-robin, so no value is a
    majority-class shortcut):

    birth_date  "17 March 1975"            (distinct day / month / year triples, 3 words)
    birth_city  "Port Lani", "Tesumo"       (syllable stems with place patterns; 1-2 words)
    university  "University of Brevo", "Ka Institute of Technology" (2-4 words)
    major       "computational linguistics", "botany" (field with an optional qualifier)
    employer    "Drumi Labs", "Fesa Holdings" (2 words)
    work_city   same city pool as birth_city

    Person names, city/university/employer stems and template words never share a word.

Formats (``FactsConfig.formats``, any of ``FORMATS``); the VALUE IS ALWAYS LAST, so a probe prompt is a
prefix of what was trained and the answer is the tokens that follow it:

    records  "Vadoru Mika birth_city Port Lani"   one document per (person, attribute): pure storage
             capacity, the attribute is a single token. One record per document (rather than one
             document of six lines per person) lets the packer interleave people and attributes freely.
    bios     "Vadoru Mika works for Drumi Labs . Vadoru Mika was born in Port Lani . ..."  one document
             per person: six sentences, each starting with the full name, each attribute written with
             one of ``bio_templates`` templates (chosen per person and attribute), sentences in a
             per-person shuffled order.
    qa       "Q : what is the birth city of Vadoru Mika ? A : Port Lani"  one document per (person, attribute),
             only for people NOT in the held-out set. The held-out people (``heldout_fraction``) still
             have their records/bios trained, so their QA probes test knowledge *extraction* (answer a
             question about a fact only ever seen in another form), not memorisation.

Every training document is ``[bos] + words + [eos]``. The ``WordTokenizer`` is built from the whole
world (all formats, held-out QA included), so the vocabulary, and thus the model, does not depend on
``formats`` or ``heldout_fraction``, and every probe can be encoded.

Probes (``FactsDataset.probes(format)``): one per person x attribute, person-major, with
``prompt`` = bos + the document up to the value and ``answer`` = the value's tokens; so for a trained
probe ``prompt + answer`` is a prefix of a training document (records and QA: the whole document but
eos; bios: the bio up to and including this value). ``heldout`` is True when that prefix is NOT trained:
QA of held-out people, or any probe of a format missing from ``formats``.
"""

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

from .packing import PackedDataset
from .tokenizers import WordTokenizer, split_words

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "work_city")
FORMATS = ("records", "bios", "qa")
MAX_CHOICES = 1000
MAX_BIO_TEMPLATES = 6

# Bio sentences are "<first> <last> <template> <value> .": the template is the words between name and value.
BIO_TEMPLATES = {
    "birth_date": [
        "was born on",
        "came into this world on",
        "entered life on",
        "first saw the light of day on",
        "has a recorded birth date of",
        "celebrates a birthday dating back to",
    ],
    "birth_city": [
        "was born in",
        "spent the first days of life in",
        "came into the world in the city of",
        "has a birthplace called",
        "was delivered at a hospital in",
        "originally hails from",
    ],
    "university": [
        "studied at",
        "graduated from",
        "received an education at",
        "was a student at",
        "earned a diploma from",
        "spent four years of study at",
    ],
    "major": [
        "majored in",
        "focused on the subject of",
        "chose to specialise in",
        "wrote a thesis in",
        "earned a degree in",
        "took most classes in",
    ],
    "employer": [
        "works for",
        "is employed by",
        "draws a salary from",
        "is on the staff of",
        "earns a living at",
        "holds a position with",
    ],
    "work_city": [
        "works in the city of",
        "has an office in",
        "commutes each day to",
        "spends the working week in",
        "has a job located in",
        "goes to work in",
    ],
}

# QA documents are "Q : <before> <first> <last> <after> A : <value>".
QA_TEMPLATES = {
    "birth_date": ("what is the birth date of", "?"),
    "birth_city": ("what is the birth city of", "?"),
    "university": ("which university did", "attend ?"),
    "major": ("what did", "study ?"),
    "employer": ("which company does", "work for ?"),
    "work_city": ("which city does", "work in ?"),
}


def _words(text: str) -> list[str]:
    return text.split()


MONTHS = _words("January February March April May June July August September October November December")
YEARS = range(1940, 2005)
DAYS = range(1, 29)

_FIELDS = _words(
    "physics chemistry biology mathematics economics history philosophy linguistics psychology sociology "
    "geology astronomy statistics engineering architecture medicine law music literature anthropology "
    "ecology genetics neuroscience finance accounting marketing design journalism education nursing "
    "pharmacology agriculture oceanography meteorology robotics cryptography logistics theology "
    "archaeology botany"
)
_QUALIFIERS = _words(
    "applied theoretical computational experimental marine molecular environmental urban medieval modern "
    "classical quantum industrial clinical digital comparative political cognitive evolutionary "
    "mathematical historical international rural structural social"
)
_CITY_PATTERNS = ("{}", "{}", "{}", "Port {}", "New {}", "{} Falls", "Lake {}", "{} Springs", "Fort {}", "{} Bay")
_UNIVERSITY_PATTERNS = (
    "University of {}",
    "{} University",
    "{} Institute of Technology",
    "{} College",
    "{} State University",
)
_EMPLOYER_SUFFIXES = _words(
    "Labs Group Systems Industries Partners Dynamics Holdings Works Media Energy Foods Capital Software Motors"
)

_ONSETS = _words("b c d f g h j k l m n p r s t v w z br dr fr gr kr pr tr st sh ch th")
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ei", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "x"]


@dataclass
class FactsConfig:
    """The synthetic biography world (see the module docstring).

    people: number of persons. seed: everything is generated from it.
    formats: comma-separated subset of "records", "bios", "qa" trained on.
    choices: values per attribute ("hundreds"; at most 1000).
    heldout_fraction: share of people whose QA pairs are never trained (extraction test).
    bio_templates: templates per attribute that bios draw from (1..6); sentence order is shuffled per person.
    """

    people: int = 1000
    seed: int = 0
    formats: str = "records,bios"
    choices: int = 200
    heldout_fraction: float = 0.2
    bio_templates: int = 4


def parse_formats(formats) -> list[str]:
    """``"records,bios"`` (or a list) -> ["records", "bios"], in canonical ``FORMATS`` order, validated."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [str(f).strip() for f in items]
    unknown = [f for f in names if f not in FORMATS]
    if unknown or not names:
        raise ValueError(
            f"FactsConfig.formats: unknown format(s) {unknown or names!r} in {formats!r}; "
            f"use a comma-separated subset of {', '.join(FORMATS)}, e.g. 'records,bios'"
        )
    return [f for f in FORMATS if f in names]


def validate(cfg: FactsConfig) -> list[str]:
    """Check ``cfg`` (ValueError naming the field and the fix); returns the parsed formats."""

    def fail(name, problem, fix):
        raise ValueError(f"FactsConfig.{name}: {problem}; {fix}")

    formats = parse_formats(cfg.formats)
    if cfg.people < 1:
        fail("people", f"must be >= 1, got {cfg.people}", "use e.g. 1000")
    if not 2 <= cfg.choices <= MAX_CHOICES:
        fail("choices", f"must be in [2, {MAX_CHOICES}], got {cfg.choices}", "use a few hundred, e.g. 200")
    if not 0.0 <= cfg.heldout_fraction < 1.0:
        fail("heldout_fraction", f"must be in [0, 1), got {cfg.heldout_fraction}", "use e.g. 0.2 (0 = none held out)")
    if not 1 <= cfg.bio_templates <= MAX_BIO_TEMPLATES:
        fail("bio_templates", f"must be in [1, {MAX_BIO_TEMPLATES}], got {cfg.bio_templates}", "use e.g. 4")
    if formats == ["qa"]:
        fail(
            "formats",
            "'qa' alone never trains the held-out people's facts, so held-out QA cannot be answered",
            "add 'records' or 'bios', e.g. 'bios,qa'",
        )
    return formats


@dataclass
class Person:
    """One invented person: ``first last`` and a value string per attribute."""

    first: str
    last: str
    values: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclass
class Probe:
    """A recall question: greedy-decode ``len(answer)`` tokens after ``prompt`` and compare with ``answer``.

    person: index into ``FactsDataset.people``; attribute: one of ``ATTRIBUTES``;
    prompt: token ids starting with bos, ending right before the value; answer: the value's token ids;
    heldout: True if ``prompt + answer`` is not in the training documents (held-out QA, untrained format).
    prior_bits: the entropy in bits of this attribute's values over all people (log2 of ``choices`` when
    every value is used equally often): what the answer tells a model that knows only which values occur
    how often, so what storing the fact adds. None when unknown (a user's probes file).
    """

    person: int
    attribute: str
    prompt: list[int]
    answer: list[int]
    heldout: bool
    prior_bits: float | None = None


def _entropy_bits(values: list) -> float:
    """Entropy in bits of the empirical distribution of ``values``."""
    n = len(values)
    return -sum(c / n * math.log2(c / n) for c in Counter(values).values())


def _rng(seed: int, purpose: str) -> random.Random:
    # One independent stream per purpose; Random(str) hashes the string with SHA-512 (stable across runs).
    return random.Random(f"memlayers.facts:{seed}:{purpose}")


def _fixed_words() -> set[str]:
    """Lower-cased words the generated stems must avoid (templates, patterns, majors, months...)."""
    texts = [t for ts in BIO_TEMPLATES.values() for t in ts]
    texts += [" ".join(q) for q in QA_TEMPLATES.values()] + ["Q : A : ."] + list(ATTRIBUTES)
    texts += _FIELDS + _QUALIFIERS + list(_CITY_PATTERNS) + list(_UNIVERSITY_PATTERNS) + _EMPLOYER_SUFFIXES + MONTHS
    return {w.lower() for t in texts for w in split_words(t)}


def _stems(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """``n`` new pronounceable capitalised words of 2-3 syllables, none (lower-cased) in ``taken`` (updated)."""
    out = []
    while len(out) < n:
        syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2 if rng.random() < 0.7 else 3)]
        word = "".join(syllables) + rng.choice(_CODAS)
        if word not in taken:
            taken.add(word)
            out.append(word.capitalize())
    return out


def generate_choices(cfg: FactsConfig) -> dict[str, list[str]]:
    """The ``cfg.choices`` possible values of each attribute (depends on ``seed`` and ``choices`` only)."""
    validate(cfg)
    n = cfg.choices
    rng = _rng(cfg.seed, "choices")
    taken = _fixed_words()
    # Value pools depend only on (seed, choices); person names are drawn later, avoiding all these words.
    cities = [rng.choice(_CITY_PATTERNS).format(s) for s in _stems(rng, n, taken)]
    universities = [rng.choice(_UNIVERSITY_PATTERNS).format(s) for s in _stems(rng, n, taken)]
    employers = [f"{s} {rng.choice(_EMPLOYER_SUFFIXES)}" for s in _stems(rng, n, taken)]
    majors = list(_FIELDS) + [f"{q} {f}" for q in _QUALIFIERS for f in _FIELDS]
    rng.shuffle(majors)
    dates = rng.sample(range(len(DAYS) * len(MONTHS) * len(YEARS)), n)
    dates = [f"{DAYS[d % 28]} {MONTHS[d // 28 % 12]} {YEARS[d // (28 * 12)]}" for d in dates]
    return {
        "birth_date": dates,
        "birth_city": cities,
        "university": universities,
        "major": majors[:n],
        "employer": employers,
        "work_city": cities,
    }


def _generate(cfg: FactsConfig) -> tuple[list[Person], dict[str, list[str]]]:
    validate(cfg)
    choices = generate_choices(cfg)
    taken = _fixed_words() | {w.lower() for vs in choices.values() for v in vs for w in split_words(v)}
    # Name pools: ~2 sqrt(people) first and last names, so each first/last name is shared by ~sqrt(people)/2
    # people and only the pair identifies a person. Pairs are drawn without replacement: names are unique.
    pool = max(8, math.ceil(2 * math.sqrt(cfg.people)))
    rng = _rng(cfg.seed, "names")
    firsts, lasts = _stems(rng, pool, taken), _stems(rng, pool, taken)
    pairs = rng.sample(range(pool * pool), cfg.people)
    people = [Person(firsts[k // pool], lasts[k % pool]) for k in pairs]
    rng = _rng(cfg.seed, "values")
    for attr in ATTRIBUTES:
        # Balanced assignment: value i % choices for person i, shuffled; every value used ~equally often.
        idx = [i % cfg.choices for i in range(cfg.people)]
        rng.shuffle(idx)
        for person, i in zip(people, idx):
            person.values[attr] = choices[attr][i]
    return people, choices


def generate_people(cfg: FactsConfig) -> list[Person]:
    """The ``cfg.people`` persons of the world, with unique names and one value per attribute."""
    return _generate(cfg)[0]


class FactsDataset(PackedDataset):
    """Tokenized synthetic biographies: training stream, validation batches and recall probes.

    Attributes: cfg, formats (trained formats, canonical order), people (list[Person]), choices
    (attribute -> its value strings), heldout (sorted person indices whose QA is never trained),
    tokenizer (WordTokenizer), vocab_size, documents (training documents, each [bos] ... [eos]).
    """

    def __init__(self, cfg: FactsConfig):
        self.cfg = cfg
        self.formats = validate(cfg)
        self.people, self.choices = _generate(cfg)
        n_held = round(cfg.heldout_fraction * cfg.people)
        self.heldout = sorted(_rng(cfg.seed, "heldout").sample(range(cfg.people), n_held))
        self._heldout_set = set(self.heldout)

        # Vocabulary: every word that any format can produce, independent of `formats`.
        fixed = [t for ts in BIO_TEMPLATES.values() for t in ts] + [" ".join(q) for q in QA_TEMPLATES.values()]
        fixed += ["Q : A : ."] + list(ATTRIBUTES)
        values = [v for vs in self.choices.values() for v in vs]
        self.tokenizer = WordTokenizer.from_texts(fixed + values + [p.name for p in self.people])
        self.vocab_size = self.tokenizer.vocab_size

        enc = self.tokenizer.encode
        self._names = [enc(p.name) for p in self.people]
        value_ids = {v: enc(v) for v in values}
        self._values = [[value_ids[p.values[a]] for a in ATTRIBUTES] for p in self.people]  # [person][attr] ids
        self._attr_ids = [enc(a) for a in ATTRIBUTES]
        self._bio_ids = [[enc(t) for t in BIO_TEMPLATES[a][: cfg.bio_templates]] for a in ATTRIBUTES]
        self._qa_ids = [(enc("Q : " + q[0]), enc(q[1] + " A :")) for q in (QA_TEMPLATES[a] for a in ATTRIBUTES)]
        self._dot = enc(".")
        rng = _rng(cfg.seed, "bios")
        self._bio_plan = [  # per person: [(attribute index, template index)] in sentence order
            [(a, rng.randrange(cfg.bio_templates)) for a in rng.sample(range(len(ATTRIBUTES)), len(ATTRIBUTES))]
            for _ in self.people
        ]

        self.documents: list[list[int]] = []
        self.documents_per_format: dict[str, int] = {}
        self.tokens_per_format: dict[str, int] = {}
        for fmt in self.formats:
            docs = self._format_documents(fmt)
            self.documents += docs
            self.documents_per_format[fmt] = len(docs)
            self.tokens_per_format[fmt] = sum(map(len, docs))
        self.seed = cfg.seed
        # validation rows: a separately seeded packing of the TRAINING documents (memorisation loss)
        self.val_documents, self.val_seed = self.documents, _rng(cfg.seed, "val").getrandbits(62)
        self._probes: dict[str, list[Probe]] = {}

    # -- documents ---------------------------------------------------------------------------------------

    def _record(self, p: int, a: int) -> tuple[list[int], int]:
        """Record of person p, attribute a, without bos/eos, and where its value starts."""
        prefix = self._names[p] + self._attr_ids[a]
        return prefix + self._values[p][a], len(prefix)

    def _qa(self, p: int, a: int) -> tuple[list[int], int]:
        before, after = self._qa_ids[a]
        prefix = before + self._names[p] + after
        return prefix + self._values[p][a], len(prefix)

    def _bio(self, p: int) -> tuple[list[int], dict[int, tuple[int, int]]]:
        """Bio of person p without bos/eos, and {attribute index: (value start, value end)}."""
        ids: list[int] = []
        spans = {}
        for a, t in self._bio_plan[p]:
            ids += self._names[p] + self._bio_ids[a][t]
            spans[a] = (len(ids), len(ids) + len(self._values[p][a]))
            ids += self._values[p][a] + self._dot
        return ids, spans

    def _format_documents(self, fmt: str, people=None) -> list[list[int]]:
        bos, eos = [self.tokenizer.bos_id], [self.tokenizer.eos_id]
        people, attrs = range(len(self.people)) if people is None else people, range(len(ATTRIBUTES))
        if fmt == "records":
            return [bos + self._record(p, a)[0] + eos for p in people for a in attrs]
        if fmt == "bios":
            return [bos + self._bio(p)[0] + eos for p in people]
        return [bos + self._qa(p, a)[0] + eos for p in people if p not in self._heldout_set for a in attrs]

    def documents_of(self, people, format: str = "records") -> list[list[int]]:
        """The training documents of the persons ``people`` (indices into ``self.people``) in ``format``, whether
        or not ``format`` is trained (QA: none for held-out people): e.g. to train on a subset of the world."""
        if format not in FORMATS:
            raise ValueError(f"FactsDataset.documents_of: unknown format {format!r}; choose one of {', '.join(FORMATS)}")
        return self._format_documents(format, people)

    def text(self, ids: list[int]) -> str:
        """Readable text of a document or probe (special tokens dropped)."""
        return self.tokenizer.decode(ids)

    # -- probes ------------------------------------------------------------------------------------------

    @property
    def probe_formats(self) -> list[str]:
        """The formats worth probing: the trained ones."""
        return list(self.formats)

    def probes(self, format: str) -> list[Probe]:
        """One ``Probe`` per person x attribute (person-major, ``ATTRIBUTES`` order) in ``format``."""
        if format not in FORMATS:
            raise ValueError(f"FactsDataset.probes: unknown format {format!r}; choose one of {', '.join(FORMATS)}")
        if format not in self._probes:
            self._probes[format] = self._make_probes(format)
        return self._probes[format]

    def _make_probes(self, fmt: str) -> list[Probe]:
        bos = [self.tokenizer.bos_id]
        untrained = fmt not in self.formats
        prior = [_entropy_bits([person.values[a] for person in self.people]) for a in ATTRIBUTES]
        out = []
        for p in range(len(self.people)):
            if fmt == "bios":
                ids, spans = self._bio(p)
            for a, attr in enumerate(ATTRIBUTES):
                if fmt == "bios":
                    start, end = spans[a]
                else:
                    ids, start = (self._record if fmt == "records" else self._qa)(p, a)
                    end = len(ids)
                heldout = untrained or (fmt == "qa" and p in self._heldout_set)
                out.append(Probe(p, attr, bos + ids[:start], ids[start:end], heldout, prior[a]))
        return out

    # -- summary -----------------------------------------------------------------------------------------

    @cached_property
    def tokens_per_epoch(self) -> int:
        return sum(self.tokens_per_format.values())

    def describe(self) -> dict:
        """Small JSON-able summary: sizes of the world and of the training corpus."""
        return {
            "kind": "facts",
            "people": len(self.people),
            "heldout_people": len(self.heldout),
            "formats": ",".join(self.formats),
            "choices": self.cfg.choices,
            "documents": len(self.documents),
            "tokens_per_epoch": self.tokens_per_epoch,
            "vocab_size": self.vocab_size,
            "tokens_per_document": {
                f: round(self.tokens_per_format[f] / max(1, self.documents_per_format[f]), 2) for f in self.formats
            },
        }

    def __repr__(self) -> str:
        d = self.describe()
        return f"FactsDataset(people={d['people']}, formats={d['formats']!r}, documents={d['documents']})"
