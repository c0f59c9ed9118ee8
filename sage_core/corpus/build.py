"""The three-context corpus the embedded default model is trained and evaluated on.

Every machine with the pinned Python has the material, so nothing is downloaded:

- ``code``: Python standard library modules (top-level ``*.py`` files), docstrings removed.
  The source is parsed with ``ast`` and written back with ``ast.unparse``, which also drops
  comments (they are prose, and prose belongs to ``text``) and normalises formatting.
- ``text``: English prose from the standard library's docstrings (one document per module:
  its docstrings in source order) and from ``pydoc_data.topics`` (one document per topic of
  the language reference), with doctest blocks removed.
- ``reasoning``: generated multi-step arithmetic and logic problems with worked solutions,
  drawn from ``random.Random`` seeded by the build seed (``reasoning_document``).

A document is a source file, a module's docstring group, a pydoc topic or one problem. The
train / held-out split is by document, never by line, and held-out text is never training
text: a held-out document equal to a training document, or to an earlier held-out one, once
whitespace is normalised (`normalise`), is dropped (`split_documents`; the generated
problems repeat, so this shrinks the reasoning held-out split below its budget). Training
documents are never dropped or moved, so dropping changes no training split. The manifest
records, per held-out part, how many documents were dropped and why.

Each part is one JSON-lines file (one JSON string per document), stored xz-compressed as
``<part>.jsonl.xz``; ``manifest.json`` records each part's decompressed size, sha256 and
document count, the build configuration and the Python version.

The stdlib differs between Python releases, so the corpus is not rebuilt at run time: the
built corpus is committed as a snapshot (``SNAPSHOT_DIR``, built with ``REFERENCE_PYTHON``),
and ``load_corpus()`` reads it and verifies every part against the manifest, on any Python.
``python -m sage_core.corpus`` regenerates it into ``data/corpus/`` and says whether it
matches the snapshot; only ``--write-snapshot`` replaces the snapshot.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import lzma
import platform
import random
import re
import sysconfig
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from sage_core.atomic import atomic_write_bytes
from sage_core.errors import CorpusError
from sage_core.paths import DATA, ROOT

CONTEXTS = ("code", "reasoning", "text")
SPLITS = ("train", "heldout")
CORPUS_VERSION = 2  # 2: held-out parts deduplicated and disjoint from train
REFERENCE_PYTHON = "3.11.7"  # the Python that built the committed snapshot
SNAPSHOT_DIR = Path(__file__).resolve().parent / "snapshot"  # committed; what everything reads
DEFAULT_DIR = DATA / "corpus"  # where a regenerating build goes unless told otherwise
MANIFEST = "manifest.json"
COMPRESSED_SUFFIX = ".xz"
REGENERATE = "python -m sage_core.corpus --write-snapshot"

# Machine-specific or not-really-source modules: excluding them keeps the corpus identical
# on every machine with the same Python release.
_EXCLUDED_CODE = re.compile(r"^(_sysconfigdata.*|this|antigravity|__hello__|__phello__.*)\.py$")
_EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "turtledemo", "__pycache__"}
_MIN_TEXT_DOC = 200  # bytes; shorter docstring groups are mostly signatures, not prose


@dataclass(frozen=True)
class CorpusConfig:
    """What to build. Byte budgets are per context (UTF-8 bytes of document text)."""

    seed: int = 0
    train_bytes: int = 1_200_000
    heldout_bytes: int = 200_000

    def scaled(self, scale: float) -> CorpusConfig:
        """The same recipe with both budgets multiplied by `scale` (tests use small builds)."""
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        return CorpusConfig(
            seed=self.seed,
            train_bytes=max(1, int(self.train_bytes * scale)),
            heldout_bytes=max(1, int(self.heldout_bytes * scale)),
        )


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# ----------------------------------------------------------------------------- code


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return tree


def code_document(path: Path) -> str | None:
    """The module's source without docstrings or comments; None if it does not parse."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    return ast.unparse(_strip_docstrings(tree)) + "\n"


def _code_candidates(root: Path) -> list[Path]:
    return [p for p in sorted(root.glob("*.py")) if not _EXCLUDED_CODE.match(p.name)]


# ----------------------------------------------------------------------------- text

_DOCTEST_LINE = re.compile(r"^\s*(>>>|\.\.\.)( |$)")


def clean_prose(text: str) -> str:
    """Dedent, drop doctest examples (prompt lines and the output that follows them up to
    the next blank line), strip trailing spaces and collapse runs of blank lines."""
    lines = inspect.cleandoc(text).splitlines()
    kept, in_example = [], False
    for line in lines:
        if _DOCTEST_LINE.match(line):
            in_example = True
            continue
        if in_example:
            if line.strip():
                continue
            in_example = False
        kept.append(line.rstrip())
    out = "\n".join(kept)
    out = re.sub(r"\n{3,}", "\n\n", out).strip()
    return out


def docstring_document(path: Path) -> str | None:
    """All docstrings of one module in source order, cleaned; None if too little prose."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                cleaned = clean_prose(doc)
                if cleaned:
                    parts.append(cleaned)
    text = "\n\n".join(parts) + "\n"
    return text if len(text.encode("utf-8")) >= _MIN_TEXT_DOC else None


def _text_candidates(root: Path) -> list[tuple[str, Path | str]]:
    """(name, source) pairs: every stdlib module outside tests and tools, then pydoc topics."""
    out: list[tuple[str, Path | str]] = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if _EXCLUDED_DIRS.intersection(rel.parts[:-1]) or _EXCLUDED_CODE.match(p.name):
            continue
        if rel.parts[0] == "pydoc_data":
            continue
        out.append((rel.as_posix(), p))
    topics = _pydoc_topics(root)
    out.extend((f"pydoc_data/topics/{key}", topics[key]) for key in sorted(topics))
    return out


def _pydoc_topics(root: Path) -> dict[str, str]:
    path = root / "pydoc_data" / "topics.py"
    if not path.is_file():
        return {}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    return {}


def _text_document(source: Path | str) -> str | None:
    if isinstance(source, Path):
        return docstring_document(source)
    text = clean_prose(source) + "\n"
    return text if len(text.encode("utf-8")) >= _MIN_TEXT_DOC else None


# ------------------------------------------------------------------------ reasoning

_NAMES = (
    "Ada", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gia", "Hugo", "Iris", "Jon",
    "Kai", "Lena", "Milo", "Nora", "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara",
)  # fmt: skip
_ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards")
_PROPERTIES = (
    ("taller", "shorter", "tallest", "shortest"),
    ("older", "younger", "oldest", "youngest"),
    ("faster", "slower", "fastest", "slowest"),
    ("heavier", "lighter", "heaviest", "lightest"),
)
_CATEGORIES = (
    ("cats", "mammals", "animals"),
    ("roses", "flowers", "plants"),
    ("squares", "rectangles", "polygons"),
    ("sparrows", "birds", "animals"),
    ("oaks", "trees", "plants"),
    ("violins", "string instruments", "instruments"),
)
_FACTS = (
    ("it rains", "the ground is wet"),
    ("the alarm rings", "the guard wakes up"),
    ("the switch is on", "the lamp is lit"),
    ("the battery is charged", "the robot moves"),
    ("the door is locked", "the key is needed"),
)


def _arithmetic(rng: random.Random) -> str:
    a, b, c, d = (rng.randint(2, 60) for _ in range(4))
    op1, op2 = rng.choice("+-"), rng.choice("+-")
    s1 = a + b if op1 == "+" else a - b
    s2 = c * d
    total = s1 + s2 if op2 == "+" else s1 - s2
    return (
        f"Problem: Compute ({a} {op1} {b}) {op2} {c} * {d}.\n"
        f"Step 1: Multiplication comes first: {c} * {d} = {s2}.\n"
        f"Step 2: The parentheses give {a} {op1} {b} = {s1}.\n"
        f"Step 3: Combine: {s1} {op2} {s2} = {total}.\n"
        f"Answer: {total}\n"
    )


def _word_problem(rng: random.Random) -> str:
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    start, give = rng.randint(20, 90), rng.randint(1, 19)
    times, left = rng.randint(2, 5), start - give
    bought = left * times
    total = left + bought
    return (
        f"Problem: {name} has {start} {item}. {name} gives {give} to {friend}, then buys "
        f"{times} times as many {item} as are left. How many {item} does {name} have now?\n"
        f"Step 1: After giving some away, {name} has {start} - {give} = {left} {item}.\n"
        f"Step 2: {name} buys {times} * {left} = {bought} more {item}.\n"
        f"Step 3: In total {name} has {left} + {bought} = {total} {item}.\n"
        f"Answer: {total}\n"
    )


def _linear_equation(rng: random.Random) -> str:
    a, x, b = rng.randint(2, 12), rng.randint(-20, 30), rng.randint(-50, 50)
    c = a * x + b
    sign = "+" if b >= 0 else "-"
    rhs = c - b
    return (
        f"Problem: Solve {a}x {sign} {abs(b)} = {c} for x.\n"
        f"Step 1: {'Subtract' if b >= 0 else 'Add'} {abs(b)} on both sides: {a}x = {rhs}.\n"
        f"Step 2: Divide both sides by {a}: x = {rhs} / {a} = {x}.\n"
        f"Check: {a} * {x} {sign} {abs(b)} = {c}.\n"
        f"Answer: x = {x}\n"
    )


def _sequence(rng: random.Random) -> str:
    start, step, n = rng.randint(-20, 40), rng.choice([-7, -5, -3, -2, 2, 3, 4, 5, 6, 9, 11]), 5
    terms = [start + i * step for i in range(n)]
    nxt = [terms[-1] + step, terms[-1] + 2 * step]
    diffs = ", ".join(f"{terms[i + 1]} - {terms[i]} = {step}" for i in range(n - 1))
    shown = ", ".join(map(str, terms))
    return (
        f"Problem: What are the next two numbers in the sequence {shown}?\n"
        f"Step 1: The differences are {diffs}.\n"
        f"Step 2: The difference is always {step}, so the sequence is arithmetic.\n"
        f"Step 3: {terms[-1]} + {step} = {nxt[0]} and {nxt[0]} + {step} = {nxt[1]}.\n"
        f"Answer: {nxt[0]}, {nxt[1]}\n"
    )


def _gcd(rng: random.Random) -> str:
    g = rng.randint(2, 25)
    a, b = g * rng.randint(2, 40), g * rng.randint(2, 40)
    if a < b:
        a, b = b, a
    lines, step, x, y = [], 1, a, b
    while y:
        q, r = divmod(x, y)
        lines.append(f"Step {step}: {x} = {q} * {y} + {r}.")
        x, y, step = y, r, step + 1
    lines.append(f"Step {step}: The remainder is 0, so the last divisor {x} is the answer.")
    return (
        f"Problem: Find the greatest common divisor of {a} and {b} with Euclid's algorithm.\n"
        + "\n".join(lines)
        + f"\nAnswer: {x}\n"
    )


def _ordering(rng: random.Random) -> str:
    people = rng.sample(_NAMES, 4)  # people[0] has the most of the property
    more, less, most, least = rng.choice(_PROPERTIES)
    facts = [(people[i], people[i + 1]) for i in range(3)]
    rng.shuffle(facts)
    stated = []
    for a, b in facts:
        stated.append(
            f"{a} is {more} than {b}." if rng.random() < 0.5 else f"{b} is {less} than {a}."
        )
    chain = " > ".join(people)
    return (
        f"Problem: {' '.join(stated)} Who is the {most}, and who is the {least}?\n"
        f"Step 1: Write each fact as 'more {more.removesuffix('er')}' first: "
        + "; ".join(f"{a} > {b}" for a, b in facts)
        + ".\n"
        f"Step 2: Chain the facts: {chain}.\n"
        f"Step 3: {people[0]} is first and {people[-1]} is last in the chain.\n"
        f"Answer: {people[0]} is the {most}; {people[-1]} is the {least}.\n"
    )


def _syllogism(rng: random.Random) -> str:
    small, middle, large = rng.choice(_CATEGORIES)
    name = rng.choice(_NAMES)
    if rng.random() < 0.5:
        return (
            f"Problem: All {small} are {middle}. All {middle} are {large}. {name} keeps one of "
            f"the {small}. Is it one of the {large}?\n"
            f"Step 1: It is one of the {small}, and all {small} are {middle}, so it is one of "
            f"the {middle}.\n"
            f"Step 2: All {middle} are {large}, so it is one of the {large}.\n"
            f"Answer: Yes.\n"
        )
    return (
        f"Problem: All {small} are {middle}. {name} has one of the {middle}. Must it be one of "
        f"the {small}?\n"
        f"Step 1: The rule only says that every one of the {small} is among the {middle}.\n"
        f"Step 2: Some {middle} may not be {small}, so being one of the {middle} proves "
        f"nothing.\n"
        f"Answer: No, not necessarily.\n"
    )


def _implication(rng: random.Random) -> str:
    p, q = rng.choice(_FACTS)
    kind = rng.randrange(3)
    if kind == 0:
        return (
            f"Problem: If {p}, then {q}. We know that {p}. What follows?\n"
            f"Step 1: The condition '{p}' holds.\n"
            f"Step 2: By modus ponens the consequence holds.\n"
            f"Answer: {q[0].upper() + q[1:]}.\n"
        )
    if kind == 1:
        return (
            f"Problem: If {p}, then {q}. We observe that it is false that {q}. What follows?\n"
            f"Step 1: If {p} were true, {q} would be true.\n"
            f"Step 2: It is not, so by modus tollens the condition is false.\n"
            f"Answer: It is false that {p}.\n"
        )
    return (
        f"Problem: If {p}, then {q}. We observe that {q}. Can we conclude that {p}?\n"
        f"Step 1: The rule says nothing about other causes of '{q}'.\n"
        f"Step 2: Concluding the condition from the consequence is the fallacy of affirming "
        f"the consequent.\n"
        f"Answer: No.\n"
    )


def _boolean(rng: random.Random) -> str:
    values = {v: rng.random() < 0.5 for v in "pqr"}
    a, b, c = values["p"], values["q"], values["r"]
    left, right = a and b, (not c) or a
    op = rng.choice(("or", "xor"))
    result = (left != right) if op == "xor" else (left or right)
    given = ", ".join(f"{k} = {v}" for k, v in values.items())
    return (
        f"Problem: Let {given}. Evaluate (p and q) {op} ((not r) or p).\n"
        f"Step 1: p and q = {a} and {b} = {left}.\n"
        f"Step 2: not r = {not c}, so (not r) or p = {not c} or {a} = {right}.\n"
        f"Step 3: {left} {op} {right} = {result}.\n"
        f"Answer: {result}\n"
    )


def _rate(rng: random.Random) -> str:
    speed, hours, extra = rng.randint(30, 120), rng.randint(2, 6), rng.randint(10, 90)
    first = speed * hours
    total = first + extra
    return (
        f"Problem: A train travels at {speed} km per hour for {hours} hours, then another "
        f"{extra} km. How far does it travel in total?\n"
        f"Step 1: Distance = speed * time = {speed} * {hours} = {first} km.\n"
        f"Step 2: Add the rest: {first} + {extra} = {total} km.\n"
        f"Answer: {total} km\n"
    )


def _remainder(rng: random.Random) -> str:
    n, m = rng.randint(100, 999), rng.randint(3, 13)
    q, r = divmod(n, m)
    return (
        f"Problem: What is the remainder when {n} is divided by {m}?\n"
        f"Step 1: {m} * {q} = {m * q}, and {m} * {q + 1} = {m * (q + 1)} is larger than {n}.\n"
        f"Step 2: {n} - {m * q} = {r}.\n"
        f"Answer: {r}\n"
    )


_REASONING_KINDS = (
    _arithmetic, _word_problem, _linear_equation, _sequence, _gcd,
    _ordering, _syllogism, _implication, _boolean, _rate, _remainder,
)  # fmt: skip


def reasoning_document(rng: random.Random) -> str:
    """One problem with its worked solution, drawn from `rng`."""
    return rng.choice(_REASONING_KINDS)(rng)


# ---------------------------------------------------------------------------- build


def _documents(context: str, config: CorpusConfig):
    """Yield the documents of `context` in a seeded order; the caller stops when full."""
    rng = random.Random(f"{config.seed}:{context}")
    if context == "reasoning":
        while True:
            yield reasoning_document(rng)
    root = stdlib_dir()
    if context == "code":
        candidates = _code_candidates(root)
        rng.shuffle(candidates)
        for path in candidates:
            doc = code_document(path)
            if doc is not None:
                yield doc
        return
    candidates = _text_candidates(root)
    rng.shuffle(candidates)
    for _name, source in candidates:
        doc = _text_document(source)
        if doc is not None:
            yield doc


def normalise(doc: str) -> str:
    """The text two documents are compared by: every run of whitespace becomes one space,
    none at either end. Documents equal after this are the same document."""
    return " ".join(doc.split())


def split_documents(
    context: str, config: CorpusConfig
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """(parts, dropped): held-out first, then train, each filled document by document up to
    its byte budget; then every held-out document that equals (`normalise`) a training
    document, or an earlier held-out one, is dropped. Train is exactly what the fill gave,
    so a held-out split is always disjoint from train and free of repeats, at the price of
    falling short of its budget where documents repeat. `dropped` counts the held-out
    documents dropped: {"in_train": ..., "repeated": ...} (a repeat of an earlier held-out
    document that is also in train counts as in_train)."""
    filled: dict[str, list[str]] = {"heldout": [], "train": []}
    sizes = {"heldout": 0, "train": 0}
    budgets = {"heldout": config.heldout_bytes, "train": config.train_bytes}
    for doc in _documents(context, config):
        split = "heldout" if sizes["heldout"] < budgets["heldout"] else "train"
        if sizes[split] >= budgets[split]:
            break
        filled[split].append(doc)
        sizes[split] += len(doc.encode("utf-8"))
    for split in SPLITS:
        if sizes[split] < budgets[split]:
            warnings.warn(
                f"corpus context {context!r}: only {sizes[split]} bytes for the {split} split "
                f"(asked {budgets[split]}); the stdlib of this Python is smaller",
                stacklevel=2,
            )
    in_train = {normalise(doc) for doc in filled["train"]}
    seen: set[str] = set()
    heldout, dropped = [], {"in_train": 0, "repeated": 0}
    for doc in filled["heldout"]:
        key = normalise(doc)
        if key in in_train:
            dropped["in_train"] += 1
        elif key in seen:
            dropped["repeated"] += 1
        else:
            seen.add(key)
            heldout.append(doc)
    return {"heldout": heldout, "train": filled["train"]}, dropped


def _part_bytes(docs: list[str]) -> bytes:
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")


def part_name(context: str, split: str) -> str:
    """The part's name in the manifest: what it holds once decompressed."""
    return f"{context}.{split}.jsonl"


def part_path(directory: Path | str, file: str) -> Path:
    """Where a part named `file` in the manifest is stored: compressed, beside the manifest."""
    return Path(directory) / f"{file}{COMPRESSED_SUFFIX}"


def read_part(directory: Path | str, file: str) -> bytes:
    """The decompressed bytes of the part named `file` (what the manifest's sha256 covers)."""
    path = part_path(directory, file)
    try:
        return lzma.decompress(path.read_bytes())
    except FileNotFoundError:
        raise CorpusError(f"corpus part {path} is missing; regenerate with: {REGENERATE}") from None
    except lzma.LZMAError as exc:
        raise CorpusError(f"corpus part {path} is not valid xz data ({exc})") from None


def build_corpus(directory: Path | str | None = None, config: CorpusConfig | None = None) -> Path:
    """Build every part and the manifest under `directory` (default data/corpus/).

    Writes the committed snapshot only when `directory` is SNAPSHOT_DIR, i.e. when asked to
    (`python -m sage_core.corpus --write-snapshot`).
    """
    config = config or CorpusConfig()
    out = Path(directory) if directory is not None else DEFAULT_DIR
    out.mkdir(parents=True, exist_ok=True)
    python = platform.python_version()
    if python != REFERENCE_PYTHON:
        warnings.warn(
            f"building the corpus with Python {python}, but the committed snapshot was built "
            f"with Python {REFERENCE_PYTHON}: the stdlib differs between releases, so this "
            f"corpus and every held-out metric computed on it will differ from the committed ones",
            stacklevel=2,
        )
    parts = {}
    for context in CONTEXTS:
        split, dropped = split_documents(context, config)
        for name in SPLITS:
            data = _part_bytes(split[name])
            file = part_name(context, name)
            # Fixed preset, no timestamps in the xz container: the same data gives the same file.
            atomic_write_bytes(part_path(out, file), lzma.compress(data, preset=9))
            parts[f"{context}/{name}"] = {
                "file": file,
                "bytes": len(data),
                "text_bytes": sum(len(d.encode("utf-8")) for d in split[name]),
                "documents": len(split[name]),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        parts[f"{context}/heldout"]["dropped"] = dropped
    manifest = {
        "corpus_version": CORPUS_VERSION,
        "config": asdict(config),
        "python_version": python,
        "reference_python_version": REFERENCE_PYTHON,
        "matches_reference_python": python == REFERENCE_PYTHON,
        "parts": parts,
    }
    atomic_write_bytes(out / MANIFEST, _canonical_json(manifest))
    return out


def _canonical_json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def manifest_sha256(directory: Path | str | None = None) -> str:
    """sha256 of the manifest file: one hash that names the whole corpus."""
    path = Path(directory if directory is not None else SNAPSHOT_DIR) / MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Corpus:
    """A built corpus on disk (the snapshot or a build). Documents are read lazily, per part."""

    directory: Path
    manifest: dict

    @property
    def sha256(self) -> str:
        return manifest_sha256(self.directory)

    def documents(self, context: str, split: str) -> list[str]:
        if context not in CONTEXTS:
            raise ValueError(f"unknown context {context!r}; expected one of {CONTEXTS}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        data = read_part(self.directory, part_name(context, split))
        return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def verify_corpus(directory: Path | str) -> dict:
    """The manifest of the corpus in `directory` once every part matches its size and sha256.

    Raises CorpusError naming the file at fault.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorpusError(
            f"corpus manifest {path} is missing; regenerate with: {REGENERATE}"
        ) from None
    except ValueError as exc:
        raise CorpusError(f"corpus manifest {path} is not valid JSON ({exc})") from None
    if manifest.get("corpus_version") != CORPUS_VERSION:
        raise CorpusError(
            f"corpus manifest {path}: corpus_version {manifest.get('corpus_version')!r}, "
            f"this library reads version {CORPUS_VERSION}"
        )
    expected = {f"{c}/{s}" for c in CONTEXTS for s in SPLITS}
    if set(manifest.get("parts", {})) != expected:
        raise CorpusError(
            f"corpus manifest {path}: parts {sorted(manifest.get('parts', {}))}, "
            f"expected {sorted(expected)}"
        )
    for key, part in manifest["parts"].items():
        data = read_part(directory, part["file"])
        if len(data) != part["bytes"] or hashlib.sha256(data).hexdigest() != part["sha256"]:
            raise CorpusError(
                f"corpus part {part_path(directory, part['file'])} ({key}) does not match its "
                f"size or sha256 in {path}"
            )
    return manifest


def load_snapshot(directory: Path | str = SNAPSHOT_DIR) -> Corpus:
    """The committed corpus snapshot, verified against its manifest. Never builds anything."""
    return Corpus(Path(directory), verify_corpus(directory))


def _cached(directory: Path, config: CorpusConfig) -> dict | None:
    """The manifest if the cache holds exactly `config`, built by this Python, intact."""
    if not (directory / MANIFEST).is_file():
        return None
    try:
        manifest = verify_corpus(directory)
    except CorpusError as exc:
        warnings.warn(f"{exc}; rebuilding", stacklevel=3)
        return None
    if manifest["config"] != asdict(config) or manifest["python_version"] != (
        platform.python_version()
    ):
        return None
    return manifest


def load_corpus(directory: Path | str | None = None, config: CorpusConfig | None = None) -> Corpus:
    """The corpus the notebooks and the default model use.

    Without `directory`: the committed snapshot (the default recipe; any other `config` is an
    error), whatever the running Python. With `directory`: a build cache for `config`, built
    there first if absent, stale or altered (tests use small builds this way).
    """
    config = config or CorpusConfig()
    if directory is None:
        snapshot = load_snapshot()
        if snapshot.manifest["config"] != asdict(config):
            raise CorpusError(
                f"the snapshot in {SNAPSHOT_DIR} holds the recipe {snapshot.manifest['config']}, "
                f"not {asdict(config)}; pass a directory to build that recipe there"
            )
        return snapshot
    out = Path(directory)
    manifest = _cached(out, config)
    if manifest is None:
        build_corpus(out, config)
        manifest = verify_corpus(out)
    return Corpus(out, manifest)


def differing_parts(a: Path | str, b: Path | str) -> list[str]:
    """Manifest keys whose sha256 differs between two built corpora (all of them if either
    manifest is missing), in manifest order."""
    try:
        parts_a = json.loads((Path(a) / MANIFEST).read_text(encoding="utf-8"))["parts"]
        parts_b = json.loads((Path(b) / MANIFEST).read_text(encoding="utf-8"))["parts"]
    except (OSError, ValueError, KeyError):
        return [f"{c}/{s}" for c in CONTEXTS for s in SPLITS]
    keys = sorted(set(parts_a) | set(parts_b))
    return [k for k in keys if parts_a.get(k, {}).get("sha256") != parts_b.get(k, {}).get("sha256")]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m sage_core.corpus",
        description="Regenerate the corpus from this Python's standard library. By default it is "
        f"built into {DEFAULT_DIR.relative_to(ROOT)}/ and compared with the committed snapshot "
        f"({SNAPSHOT_DIR.relative_to(ROOT)}/); only --write-snapshot replaces the snapshot.",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--out", type=Path, default=DEFAULT_DIR, help="build here")
    target.add_argument(
        "--write-snapshot", action="store_true", help="replace the committed snapshot"
    )
    args = parser.parse_args(argv)
    out = SNAPSHOT_DIR if args.write_snapshot else args.out
    build_corpus(out)
    if out == SNAPSHOT_DIR:
        print(f"wrote the snapshot {SNAPSHOT_DIR}; manifest sha256 {manifest_sha256(out)}")
        return 0
    differ = differing_parts(out, SNAPSHOT_DIR)
    if differ:
        print(
            f"built {out}: differs from the committed snapshot in {', '.join(differ)} "
            f"(snapshot unchanged; --write-snapshot replaces it)"
        )
    else:
        print(f"built {out}: identical to the committed snapshot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
