"""Prompt degradation: build the dispreferred prompt c⁻ of each DDSPO pair.

Three methods:

* ``random``: drop a random 40-70% of the words as the official DDSPO code does (ratio
  uniform in [0.4, 0.7], ``k = max(1, int(ratio * n))`` words dropped; never all).
* ``structural``: change what the prompt *means*, keeping it fluent: drop or swap an
  attribute (colour, count, size, material, state), swap two attributes between
  objects, flip or drop a spatial relation, drop, swap or replace an object. Uses
  the small built-in lexicon in :mod:`ddspo_fast.data.lexicon`.
* ``llm``: a local instruction-tuned causal LM rewrites the prompt, removing or altering
  its important words (:mod:`ddspo_fast.data.degrade_llm`); every output is validated.

Each prompt gets up to ``variants`` distinct degraded versions, none equal to the
original, from at most ``tries`` draws: ``random`` draws 5 times per prompt as the
official random_removal.py does (so a short prompt can yield fewer distinct variants);
``structural`` draws up to max(40, 20 x variants) times. ``tries=N`` sets the number
for either method (the earlier random default was max(40, 20 x variants)). For the
rule-based methods randomness is seeded per prompt from ``(seed, method, prompt)``, so
the output for a prompt does not depend on the other prompts or their order. Prompts that cannot be degraded are returned in ``DegradeResult.skipped``
with a reason.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import lexicon
from ..fsio import atomic_write_jsonl, iter_jsonl

RULE_METHODS = ("random", "structural")  # need nothing but the prompt
METHODS = RULE_METHODS + ("llm",)
DROP_MIN, DROP_MAX = 0.4, 0.7

PromptLike = Union[str, Dict[str, object]]


@dataclass
class DegradeResult:
    """``records``: ``{"id", "prompt", "neg_prompts"}`` per degraded prompt;
    ``skipped``: ``{"id", "prompt", "reason"}`` per prompt left out;
    ``rejected`` (``llm`` only): ``{"id", "prompt", "output", "reason"}`` per LLM output
    that failed validation."""

    records: List[dict] = field(default_factory=list)
    skipped: List[dict] = field(default_factory=list)
    rejected: List[dict] = field(default_factory=list)

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)

    @property
    def variant_count(self) -> int:
        return sum(len(r["neg_prompts"]) for r in self.records)

    def summary(self) -> str:
        s = f"degraded {len(self.records)} prompts into {self.variant_count} variants; skipped {self.skipped_count}"
        if self.skipped:
            reasons: Dict[str, int] = {}
            for r in self.skipped:
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
            s += " (" + "; ".join(f"{n} x {why}" for why, n in sorted(reasons.items())) + ")"
        if self.rejected:
            s += f"; rejected {len(self.rejected)} LLM outputs"
        return s


class CannotDegrade(Exception):
    """A prompt has nothing the chosen method can change."""


class _Retry(Exception):
    """This random draw produced nothing usable; another draw may."""


# --------------------------------------------------------------------------- text utils

# Words are runs of letters, digits and underscores in any script ("ünïcödé" is one word,
# not seven), joined by inner apostrophes or hyphens; any other non-space character is a token.
_TOKEN_RE = re.compile(r"\w+(?:['’\-]\w+)*|[^\w\s]")
_NO_SPACE_BEFORE = set(",.;:!?)]}%")
_NO_SPACE_AFTER = set("([{")
_EDGE_JUNK = {",", ";", ":", "and", "with", "-", "&"}


def _norm(text: str) -> str:
    """Comparison key: case, spacing and punctuation spacing do not make prompts differ."""
    return " ".join(t.lower() for t in _TOKEN_RE.findall(text))


def tokenize(text: str) -> List[str]:
    return _TOKEN_RE.findall(text)


def _fix_articles(tokens: List[str]) -> List[str]:
    out = list(tokens)
    for i, tok in enumerate(out[:-1]):
        low = tok.lower()
        if low in ("a", "an") and out[i + 1][:1].isalpha():
            nxt = out[i + 1].lower()
            want = "an" if nxt[0] in "aeiou" and not nxt.startswith(("uni", "use", "one")) else "a"
            out[i] = want if tok.islower() else want.capitalize()
    return out


def detokenize(tokens: Sequence[str], capitalize: bool = False) -> str:
    toks = [t for t in tokens if t]
    # dangling connectors / punctuation at either end read as noise, not meaning
    while toks and toks[0].lower() in _EDGE_JUNK:
        toks.pop(0)
    while toks and toks[-1].lower() in _EDGE_JUNK:
        toks.pop()
    cleaned: List[str] = []
    for t in toks:
        if cleaned and t in (",", ";") and cleaned[-1] in (",", ";"):
            continue  # a drop can leave ", ," behind
        cleaned.append(t)
    cleaned = _fix_articles(cleaned)
    text = ""
    for t in cleaned:
        if not text or t[0] in _NO_SPACE_BEFORE or text[-1] in _NO_SPACE_AFTER:
            text += t
        else:
            text += " " + t
    if capitalize and text:
        text = text[0].upper() + text[1:]
    return text


def _rng(seed: int, method: str, prompt: str) -> random.Random:
    # str seeds are hashed with SHA-512 by random.Random: stable across runs and
    # independent of PYTHONHASHSEED.
    return random.Random(f"{seed}\x1f{method}\x1f{prompt}")


# --------------------------------------------------------------------------- random


def _random_variant(prompt: str, rng: random.Random) -> str:
    # The official KU-MIIL/DDSPO data_prep/random_removal.py statistics: a ratio drawn
    # uniformly from [0.4, 0.7], k = max(1, int(ratio * n)) of the n words dropped
    # (so k can fall just below 40% of n, never reaches n, and is not uniform over k).
    words = prompt.split()
    n = len(words)
    if n < 2:
        raise CannotDegrade(f"too short to drop 40-70% of its words ({n} word{'s' if n != 1 else ''})")
    k = max(1, int(rng.uniform(DROP_MIN, DROP_MAX) * n))
    drop = set(rng.sample(range(n), k))
    kept = [w for i, w in enumerate(words) if i not in drop]
    # Tidy separators left dangling at either end ("dog," -> "dog"), but never drop a
    # word doing it: the number of words removed is exactly k, as officially.
    if kept and any(c.isalnum() for c in kept[0]):
        kept[0] = kept[0].lstrip(_TIDY)
    if kept and any(c.isalnum() for c in kept[-1]):
        kept[-1] = kept[-1].rstrip(_TIDY)
    return " ".join(kept)


_TIDY = ",;:-&"


# --------------------------------------------------------------------------- structural

_ATTR = lexicon.attribute_index()
_OBJECTS = frozenset(lexicon.OBJECTS)
_RELATIONS = lexicon.relation_phrases()
# one-word relations so common they often are not spatial ("in the style of")
_WEAK_RELATIONS = {("on",), ("in",), ("over",), ("around",), ("between",)}
_PLURAL_NOUN_BREAKS = {",", ".", ";", "and", "with", "while", "near"}


_IRREGULAR_SINGULAR = {pl: sg for sg, pl in lexicon.IRREGULAR_PLURALS.items() if sg in _OBJECTS}


def _singular(word: str) -> Optional[str]:
    """The lexicon noun ``word`` is a form of (``"dogs"`` -> ``"dog"``), or None."""
    w = word.lower()
    if w in _OBJECTS:
        return w
    if w in _IRREGULAR_SINGULAR:
        return _IRREGULAR_SINGULAR[w]
    for suffix, repl in (("ies", "y"), ("es", ""), ("s", "")):
        if w.endswith(suffix) and w[: -len(suffix)] + repl in _OBJECTS:
            return w[: -len(suffix)] + repl
    return None


def _inflect_like(base: str, old: str) -> str:
    """``base`` in the grammatical number (and capitalisation) of ``old``."""
    new = base if old.lower() == _singular(old) else lexicon.plural(base)
    return _match_case(new, old)


def _match_case(new: str, old: str) -> str:
    return new.capitalize() if old[:1].isupper() else new


@dataclass
class _Analysis:
    attrs: List[Tuple[int, str]]  # (position, group)
    relations: List[Tuple[int, int, bool]]  # (start, end exclusive, weak)
    objects: List[int]


def _analyse(tokens: List[str]) -> _Analysis:
    low = [t.lower() for t in tokens]
    relations: List[Tuple[int, int, bool]] = []
    taken = set()
    for phrase in _RELATIONS:
        L = len(phrase)
        for i in range(len(low) - L + 1):
            if tuple(low[i : i + L]) == phrase and not taken.intersection(range(i, i + L)):
                relations.append((i, i + L, phrase in _WEAK_RELATIONS))
                taken.update(range(i, i + L))
    attrs: List[Tuple[int, str]] = []
    objects: List[int] = []
    for i, w in enumerate(low):
        if i in taken:
            continue
        nxt = low[i + 1] if i + 1 < len(low) else ""
        # a word in both lists ("orange") is an attribute when it modifies what follows
        modifies = bool(nxt) and (_singular(nxt) is not None or nxt in _ATTR)
        if w in _ATTR and (modifies or _singular(w) is None):
            attrs.append((i, _ATTR[w]))
        elif _singular(w) is not None:
            objects.append(i)
    return _Analysis(attrs, sorted(relations), objects)


def _np_span(tokens: List[str], pos: int, attr_pos: set) -> Tuple[int, int]:
    """Span of the noun phrase ending at object ``pos``: determiners and attributes before it."""
    low = [t.lower() for t in tokens]
    start = pos
    while start > 0 and (start - 1 in attr_pos or low[start - 1] in lexicon.DETERMINERS):
        start -= 1
    return start, pos + 1


def _op_drop_attr(tokens, an, rng):
    i, _ = rng.choice(an.attrs)
    return tokens[:i] + tokens[i + 1 :]


def _op_swap_attr(tokens, an, rng):
    cands = [(i, g) for i, g in an.attrs if g in lexicon.ATTRIBUTE_GROUPS]
    i, g = rng.choice(cands)
    old = tokens[i].lower()
    choices = [w for w in lexicon.ATTRIBUTE_GROUPS[g]
               if not lexicon.same_meaning(w, old) and _ATTR.get(w) == g]
    out = list(tokens)
    out[i] = _match_case(rng.choice(choices), tokens[i])
    return out


def _same_group_pairs(tokens, an):
    pairs = []
    for a in range(len(an.attrs)):
        for b in range(a + 1, len(an.attrs)):
            (i, gi), (j, gj) = an.attrs[a], an.attrs[b]
            if gi == gj and not lexicon.same_meaning(tokens[i], tokens[j]):
                pairs.append((i, j))
    return pairs


def _op_swap_binding(tokens, an, rng):
    i, j = rng.choice(_same_group_pairs(tokens, an))
    out = list(tokens)
    out[i], out[j] = _match_case(tokens[j].lower(), tokens[i]), _match_case(tokens[i].lower(), tokens[j])
    return out


def _strong_relations(an):
    strong = [r for r in an.relations if not r[2]]
    return strong or list(an.relations)


def _op_flip_relation(tokens, an, rng):
    s, e, _ = rng.choice(_strong_relations(an))
    phrase = " ".join(t.lower() for t in tokens[s:e])
    new = lexicon.RELATION_OPPOSITES[phrase].split()
    new[0] = _match_case(new[0], tokens[s])
    return tokens[:s] + new + tokens[e:]


def _op_drop_relation(tokens, an, rng):
    s, e, _ = rng.choice(_strong_relations(an))
    low = [t.lower() for t in tokens]
    end = e
    while end < len(tokens) and low[end] not in _PLURAL_NOUN_BREAKS:
        end += 1
    if s == 0:
        raise _Retry()  # "on a mat" has nothing left before the relation
    return tokens[:s] + tokens[end:]


def _op_swap_objects(tokens, an, rng):
    pairs = [(a, b) for x, a in enumerate(an.objects) for b in an.objects[x + 1 :]
             if not lexicon.same_meaning(_singular(tokens[a]), _singular(tokens[b]))]
    i, j = rng.choice(pairs)
    out = list(tokens)
    # swap the things, keep each slot's number: "two dogs next to a car" -> "two cars next to a dog"
    out[i] = _inflect_like(_singular(tokens[j]), tokens[i])
    out[j] = _inflect_like(_singular(tokens[i]), tokens[j])
    return out


def _op_drop_object(tokens, an, rng):
    pos = rng.choice(an.objects)
    attr_pos = {i for i, _ in an.attrs}
    s, e = _np_span(tokens, pos, attr_pos)
    low = [t.lower() for t in tokens]
    rel_ends = {r[1]: r[0] for r in an.relations}
    rel_starts = {r[0]: r[1] for r in an.relations}
    if s in rel_ends:  # "a cat on [a mat]": the relation goes with its object
        s = rel_ends[s]
    elif e in rel_starts and s == 0:  # "[a cat] on a mat" -> "a mat"
        e = rel_starts[e]
    elif s > 0 and low[s - 1] in ("and", "with", ","):
        s -= 1
    return tokens[:s] + tokens[e:]


def _op_replace_object(tokens, an, rng):
    pos = rng.choice(an.objects)
    old = tokens[pos]
    base = _singular(old)
    new = rng.choice([o for o in lexicon.OBJECTS if not lexicon.same_meaning(o, base)])
    out = list(tokens)
    out[pos] = _inflect_like(new, old)  # plural in, plural out
    return out


_Op = Callable[[List[str], _Analysis, random.Random], List[str]]


def _applicable_ops(tokens: List[str], an: _Analysis) -> List[_Op]:
    ops: List[_Op] = []
    if an.attrs:
        ops.append(_op_drop_attr)
        if any(g in lexicon.ATTRIBUTE_GROUPS for _, g in an.attrs):
            ops.append(_op_swap_attr)
        if _same_group_pairs(tokens, an):
            ops += [_op_swap_binding, _op_swap_binding]  # the most compositional change: weight it up
    if an.relations:
        ops += [_op_flip_relation, _op_drop_relation]
    if an.objects:
        ops.append(_op_replace_object)
        if len(an.objects) >= 2:
            ops += [_op_drop_object, _op_swap_objects]
    return ops


def _structural_variant(prompt: str, rng: random.Random) -> str:
    tokens = tokenize(prompt)
    an = _analyse(tokens)
    ops = _applicable_ops(tokens, an)
    if not ops:
        raise CannotDegrade("nothing to change structurally (no colour, count, size, relation or known object)")
    out = rng.choice(ops)(tokens, an, rng)
    if rng.random() < 0.3:  # sometimes stack a second change
        an2 = _analyse(out)
        ops2 = _applicable_ops(out, an2)
        if ops2:
            try:
                out = rng.choice(ops2)(out, an2, rng)
            except (_Retry, IndexError):
                pass
    return detokenize(out, capitalize=prompt[:1].isupper())


# --------------------------------------------------------------------------- API


OFFICIAL_RANDOM_TRIES = 5  # KU-MIIL/DDSPO data_prep/random_removal.py


def default_tries(method: str, variants: int) -> int:
    """Draws per prompt when ``tries`` is not given: the official 5 for ``random``."""
    return OFFICIAL_RANDOM_TRIES if method == "random" else max(40, 20 * variants)


def degrade_prompt(prompt: str, method: str = "random", variants: int = 1, seed: int = 0,
                   *, window=None, tries: Optional[int] = None) -> List[str]:
    """Up to ``variants`` distinct degraded versions of one prompt.

    ``window`` (a :class:`~ddspo_fast.data.token_window.TokenWindow`): only the part of
    the prompt the text encoders see is degraded and the rest is kept as is, so the
    change is never lost to truncation (for ``random`` the 40-70% then counts the visible
    words). Raises :class:`CannotDegrade` (with the reason) when there is no variant.
    """
    _check_args(method, variants, seed, tries)
    if method not in RULE_METHODS:
        raise ValueError(f"method {method!r}: degrade_prompt runs the rule-based methods "
                         f"{RULE_METHODS}; use degrade_prompts(..., method='llm', llm=...)")
    if not isinstance(prompt, str) or not prompt.strip():
        raise CannotDegrade("empty prompt")
    head, tail = window.split(prompt) if window is not None else (prompt, "")
    if not head.strip():
        raise CannotDegrade("the text encoder sees none of the prompt")
    make = _random_variant if method == "random" else _structural_variant
    rng = _rng(seed, method, prompt)
    seen = {_norm(head)}
    out: List[str] = []
    for _ in range(tries or default_tries(method, variants)):
        try:
            cand = make(head, rng)
        except (_Retry, IndexError):
            continue
        key = _norm(cand)
        if not key or key in seen:
            continue
        seen.add(key)
        out.append(cand + tail)
        if len(out) == variants:
            break
    if not out:
        raise CannotDegrade("no degraded variant differs from the original"
                            + (" within the text encoder's window" if tail else ""))
    return out


def _check_args(method, variants, seed, tries=None) -> None:
    if tries is not None and (isinstance(tries, bool) or not isinstance(tries, int) or tries < 1):
        raise ValueError(f"tries must be None or an int >= 1, got {tries!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if isinstance(variants, bool) or not isinstance(variants, int) or variants < 1:
        raise ValueError(f"variants must be an int >= 1, got {variants!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")


def _as_items(prompts: Iterable[PromptLike]) -> List[Tuple[str, object]]:
    if isinstance(prompts, (str, bytes)):
        raise ValueError("prompts must be a list of prompts (or {'id', 'prompt'} dicts), not a single string")
    items: List[Tuple[str, object]] = []
    seen = set()
    for i, p in enumerate(prompts):
        if isinstance(p, dict):
            pid = str(p["id"]) if p.get("id") is not None else f"{i:06d}"
            text = p.get("prompt")
        else:
            pid, text = f"{i:06d}", p
        if pid in seen:
            raise ValueError(f"prompts: duplicate id {pid!r}")
        seen.add(pid)
        items.append((pid, text))
    return items


def degrade_prompts(
    prompts: Iterable[PromptLike], method: str = "random", variants: int = 1, seed: int = 0,
    *, window=None, llm=None, tries: Optional[int] = None,
) -> DegradeResult:
    """Degrade each prompt; see the module docstring.

    ``prompts``: strings, or dicts with ``prompt`` (and optionally ``id``). Ids default
    to the prompt's position, zero-padded (``"000042"``). ``window``: see
    :func:`degrade_prompt`. ``llm``: a :class:`~ddspo_fast.data.degrade_llm.LLMDegrader`,
    required by (and only used with) ``method="llm"``. ``tries``: draws per prompt of the
    rule-based methods (see :func:`degrade_prompt`).
    """
    _check_args(method, variants, seed, tries)
    if method == "llm":
        if llm is None:
            raise ValueError("method 'llm' needs llm=LLMDegrader.from_pretrained(MODEL_DIR) "
                             "(on the command line: --llm MODEL_DIR)")
        if window is not None and llm.window is None:
            llm.window = window
        return llm.degrade(_as_items(prompts), variants, seed)
    if llm is not None:
        raise ValueError(f"llm: only used with method='llm', not {method!r}")
    result = DegradeResult()
    for pid, text in _as_items(prompts):
        try:
            negs = degrade_prompt(text, method=method, variants=variants, seed=seed,  # type: ignore[arg-type]
                                  window=window, tries=tries)
        except CannotDegrade as e:
            result.skipped.append({"id": pid, "prompt": text, "reason": str(e)})
            continue
        result.records.append({"id": pid, "prompt": text, "neg_prompts": negs})
    return result


def read_prompts(path) -> List[dict]:
    """Prompts from a ``.txt`` (one per line, blank lines ignored) or ``.jsonl`` file
    (objects with a ``prompt`` field and optional ``id``)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"prompts file {p} is a directory (expected a .txt or .jsonl file)")
    if not p.is_file():
        raise ValueError(f"prompts file {p} does not exist")
    suffix = p.suffix.lower()
    items: List[dict] = []
    if suffix in (".jsonl", ".json"):
        for lineno, _raw, obj in iter_jsonl(p):
            if isinstance(obj, json.JSONDecodeError):
                raise ValueError(f"{p}:{lineno}: invalid JSON ({obj.msg})")
            if isinstance(obj, Exception):  # not UTF-8
                raise ValueError(f"{p}:{lineno}: {obj}")
            if not isinstance(obj, dict) or "prompt" not in obj:
                raise ValueError(f"{p}:{lineno}: expected an object with a 'prompt' field")
            if not isinstance(obj["prompt"], str):
                raise ValueError(f"{p}:{lineno}: 'prompt' must be a string")
            item = {"prompt": obj["prompt"]}
            if obj.get("id") is not None:
                item["id"] = str(obj["id"])
            items.append(item)
    elif suffix in (".txt", ""):
        items = [{"prompt": text} for text in _text_lines(p) if text]
    else:
        raise ValueError(f"prompts file {p}: expected a .txt (one prompt per line) or .jsonl file, got {suffix!r}")
    return items


def prompt_texts(path) -> List[str]:
    """The prompts of a file as ``read_prompts`` reads it, at least one; a bad or empty
    file is a ValueError ``"prompts: ..."`` (the argument it is about)."""
    try:
        prompts = [item["prompt"] for item in read_prompts(path)]
    except ValueError as e:
        raise ValueError(f"prompts: {e}") from e
    if not prompts:
        raise ValueError(f"prompts: no prompts in {path}")
    return prompts


def _text_lines(path: Path) -> List[str]:
    """The stripped lines of a UTF-8 text file. Only ``\n`` (or ``\r\n``) ends a line: a
    bare ``\r`` inside a line is whitespace in the prompt, not a line break, as in JSONL.
    A line that is not UTF-8 is an error naming the file and line."""
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the "
                                 "line); re-save the file as UTF-8") from None
            out.append(text.strip())
    if out and out[0].startswith("\ufeff"):  # a UTF-8 byte-order mark is not part of the prompt
        out[0] = out[0][1:].strip()
    return out


def degrade_file(path, out, *, method: str = "random", variants: int = 1, seed: int = 0,
                 window=None, llm=None, tries: Optional[int] = None) -> DegradeResult:
    """Read prompts from ``path``, degrade them, write JSONL to ``out`` atomically."""
    _check_args(method, variants, seed, tries)
    from ..fsio import check_output_apart

    check_output_apart(out, "out", [("prompts", path)])
    if Path(out).is_dir():
        raise ValueError(f"out: {out} is a directory (expected the path of the JSONL file to write)")
    result = degrade_prompts(read_prompts(path), method=method, variants=variants, seed=seed,
                             window=window, llm=llm, tries=tries)
    atomic_write_jsonl(Path(out), result.records)
    return result
