"""Prompt degradation: the 40-70% rule, structural changes, determinism, skips, files."""

import json

import pytest

from ddspo_fast.data import degrade as dg
from ddspo_fast.data.degrade import _norm, degrade_file, degrade_prompt, degrade_prompts, read_prompts

PROMPTS = [
    "a red cube on top of a blue sphere",
    "three small dogs playing in a green field next to a wooden fence",
    "A photo of an orange cat sleeping next to a brown chair, highly detailed, 4k",
    "two dogs next to a car",
    "portrait of an old man with a long white beard",
    "a big yellow bus parked behind a tiny red car",
    "two words",
]


@pytest.mark.parametrize("method", dg.RULE_METHODS)
def test_deterministic_distinct_and_never_equal(method):
    a = degrade_prompts(PROMPTS, method=method, variants=4, seed=7)
    b = degrade_prompts(PROMPTS, method=method, variants=4, seed=7)
    c = degrade_prompts(PROMPTS, method=method, variants=4, seed=8)
    assert a.records == b.records and a.skipped == b.skipped
    assert a.records != c.records  # the seed matters
    assert a.skipped_count == 0 and len(a.records) == len(PROMPTS)
    for rec in a.records:
        negs = rec["neg_prompts"]
        assert 1 <= len(negs) <= 4
        assert len({_norm(n) for n in negs}) == len(negs)  # distinct
        assert all(_norm(n) != _norm(rec["prompt"]) and n.strip() for n in negs)
    # several variants are found for every long prompt
    assert all(len(r["neg_prompts"]) == 4 for r in a.records if len(r["prompt"].split()) >= 6)


@pytest.mark.parametrize("method", dg.RULE_METHODS)
def test_output_for_a_prompt_does_not_depend_on_the_others(method):
    both = degrade_prompts(PROMPTS, method=method, variants=3, seed=1)
    alone = degrade_prompts([PROMPTS[4]], method=method, variants=3, seed=1)
    assert both.records[4]["neg_prompts"] == alone.records[0]["neg_prompts"]
    assert [r["id"] for r in both.records] == [f"{i:06d}" for i in range(len(PROMPTS))]


def _official_k_range(n):
    # KU-MIIL/DDSPO data_prep/random_removal.py: k = max(1, int(U(0.4, 0.7) * n))
    return max(1, int(0.4 * n)), max(1, int(0.7 * n - 1e-9))


def test_random_drops_words_as_the_official_code():
    prompts = [" ".join(f"w{j}" for j in range(n)) for n in range(2, 25)]
    res = degrade_prompts(prompts, method="random", variants=6, seed=3)
    assert res.skipped_count == 0
    for rec in res.records:
        words = rec["prompt"].split()
        n = len(words)
        lo, hi = _official_k_range(n)
        for neg in rec["neg_prompts"]:
            kept = neg.split()
            dropped = n - len(kept)
            assert dropped >= 1 and len(kept) >= 1
            assert lo <= dropped <= hi, (n, dropped)
            it = iter(words)  # kept words stay in their original order
            assert all(w in it for w in kept)


def test_random_drop_count_follows_the_official_distribution():
    # n = 7: int(U * 7) for U ~ U(0.4, 0.7) is 2 on [0.4, 3/7), 3 on [3/7, 4/7), 4 on
    # [4/7, 0.7): probabilities 0.2/2.1, 1/2.1, 0.9/2.1. The draws are seeded, so this
    # is deterministic; 3000 draws put each frequency within 0.03 of its probability.
    prompt = " ".join(f"w{j}" for j in range(7))
    counts = {}
    for seed in range(3000):
        k = 7 - len(degrade_prompt(prompt, method="random", seed=seed)[0].split())
        counts[k] = counts.get(k, 0) + 1
    assert set(counts) == {2, 3, 4}
    for k, p in {2: 0.2 / 2.1, 3: 1 / 2.1, 4: 0.9 / 2.1}.items():
        assert abs(counts[k] / 3000 - p) < 0.03, (k, counts)


def test_random_tidies_separators_without_breaking_the_rule():
    res = degrade_prompts(["cat , dog , bird , fish , cow"], method="random", variants=5, seed=0)
    lo, hi = _official_k_range(9)
    for neg in res.records[0]["neg_prompts"]:
        dropped = 9 - len(neg.split())
        assert lo <= dropped <= hi
    res = degrade_prompts(["red, big, old, cat, dog, cow"], method="random", variants=8, seed=1)
    for neg in res.records[0]["neg_prompts"]:
        assert not neg.endswith(",") and 6 - len(neg.split()) in range(2, 5)


def test_skipped_prompts_are_counted_with_reasons():
    res = degrade_prompts(["cat", "", "   ", "a dog in a house"], method="random", variants=2)
    assert res.skipped_count == 3 and len(res.records) == 1
    reasons = [s["reason"] for s in res.skipped]
    assert reasons[0].startswith("too short") and reasons[1] == reasons[2] == "empty prompt"
    assert [s["id"] for s in res.skipped] == ["000000", "000001", "000002"]
    assert "skipped 3" in res.summary()

    res = degrade_prompts(["Abstract impressionist painting", "a blue house"], method="structural")
    assert res.skipped_count == 1 and "nothing to change" in res.skipped[0]["reason"]
    assert res.records[0]["id"] == "000001"


def test_structural_changes_attributes_relations_and_objects():
    prompt = "a red cube on top of a blue sphere"
    negs = degrade_prompt(prompt, method="structural", variants=25, seed=0)
    low = [n.lower() for n in negs]
    assert any("underneath" in n for n in low), negs  # relation flipped
    assert any(n in ("a red cube", "a blue sphere") for n in low), negs  # relation / object dropped
    assert any("blue cube" in n and "red sphere" in n for n in low), negs  # attribute binding swapped
    assert any(("cube" in n and "sphere" in n) and not ("red" in n and "blue" in n) for n in low), negs  # colour changed or dropped
    for n in negs:
        assert n[0].islower()  # the original's case is kept


def test_structural_keeps_grammar_on_swaps():
    negs = degrade_prompt("two dogs next to a car", method="structural", variants=25, seed=2)
    for n in negs:
        toks = n.lower().split()
        assert "a dogs" not in n.lower() and "two car " not in n.lower() + " "
        for i, t in enumerate(toks[:-1]):
            if t == "an":
                assert toks[i + 1][0] in "aeiou"
            if t == "a":
                assert toks[i + 1][0] not in "aeiou"
    assert degrade_prompt("An old car", method="structural", variants=5, seed=0)[0][0].isupper()


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        degrade_prompts(["a cat"], method="llm")
    with pytest.raises(ValueError, match="variants"):
        degrade_prompts(["a cat"], variants=0)
    with pytest.raises(ValueError, match="seed"):
        degrade_prompts(["a cat"], seed="1")
    with pytest.raises(ValueError, match="prompts"):
        degrade_prompts("a cat on a mat")
    with pytest.raises(ValueError, match="duplicate id"):
        degrade_prompts([{"id": "x", "prompt": "a cat"}, {"id": "x", "prompt": "a dog"}])


def test_read_and_degrade_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red car\n\n  a green tree  \ncat\n")
    assert [p["prompt"] for p in read_prompts(txt)] == ["a red car", "a green tree", "cat"]

    jl = tmp_path / "p.jsonl"
    jl.write_text('{"id": "a1", "prompt": "a red car on a road"}\n{"prompt": "two cats"}\n')
    out = tmp_path / "out" / "neg.jsonl"
    res = degrade_file(jl, out, method="structural", variants=2, seed=5)
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert lines == res.records and [l["id"] for l in lines] == ["a1", "000001"]
    assert set(lines[0]) == {"id", "prompt", "neg_prompts"}
    assert not [p for p in out.parent.iterdir() if p.name != "neg.jsonl"]  # no temp file left

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*'prompt'"):
        read_prompts(bad)
    bad.write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*invalid JSON"):
        read_prompts(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "p.csv").write_text("x")
    with pytest.raises(ValueError, match=r"\.txt.*\.jsonl"):
        read_prompts(tmp_path / "p.csv")


# ---------------------------------------------------------------- words, lines, synonyms, windows


def test_structural_keeps_non_ascii_words_whole():
    prompt = "a red ünïcödé cube on top of a blue sphere near a café"
    negs = degrade_prompt(prompt, method="structural", variants=20, seed=0)
    assert len(negs) >= 5
    for n in negs:
        non_ascii = {w for w in n.replace(",", " ").split() if not w.isascii()}
        assert non_ascii <= {"ünïcödé", "café"}, n


def test_text_files_split_lines_on_newlines_only_and_name_bad_bytes(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"\xef\xbb\xbfa red car\ron a road\nsecond prompt\r\n\n third \n")
    assert [p["prompt"] for p in read_prompts(f)] == ["a red car\ron a road", "second prompt", "third"]
    f.write_bytes("a red car\nun caf\xe9 noir\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"p.txt:2: not UTF-8 text .*re-save the file as UTF-8"):
        read_prompts(f)
    j = tmp_path / "p.jsonl"
    j.write_bytes('{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"p.jsonl:2: not UTF-8 text"):
        read_prompts(j)


def test_swaps_never_pick_a_near_synonym():
    from ddspo_fast.data import lexicon

    prompt = "a large dog next to a metal chair and a bike"
    negs = degrade_prompt(prompt, method="structural", variants=60, seed=4)
    synonyms = {"big", "huge", "giant", "massive", "enormous", "metallic", "steel", "bicycle"}
    assert len(negs) >= 30 and not any(synonyms & set(n.split()) for n in negs), negs
    # every attribute word of the lexicon: a swap lands outside its near-synonym set
    for group, words in lexicon.ATTRIBUTE_GROUPS.items():
        for w in words:
            if dg._ATTR.get(w) != group:
                continue
            tokens = [w, "dog"]
            an = dg._analyse(tokens)
            for s in range(5):
                new = dg._op_swap_attr(tokens, an, dg.random.Random(s))[0]
                assert not lexicon.same_meaning(new, w), (w, new)
    assert lexicon.same_meaning("Large", "massive") and not lexicon.same_meaning("large", "small")


def test_long_prompts_are_degraded_inside_the_text_encoder_window():
    from _train_helpers import tiny_model

    from ddspo_fast.data.token_window import TokenWindow

    window = TokenWindow.from_model(tiny_model("sd15"))
    prompt = ", ".join(["a red cube on top of a blue sphere"] * 12)  # far past 77 CLIP tokens
    head, tail = window.split(prompt)
    assert head and tail and head + tail == prompt
    tok = window.encoders[0][0]
    assert len(tok(head)["input_ids"]) <= 77 < len(tok(prompt)["input_ids"])
    for method in ("random", "structural"):
        negs = degrade_prompt(prompt, method=method, variants=4, seed=1, window=window)
        assert len(negs) == 4
        for n in negs:
            assert n.endswith(tail)  # the part the encoder never reads is left alone
            assert _norm(window.split(n)[0]) != _norm(head)
    # a prompt with a short visible part: the words past the window are kept whole
    short = "a cat " + " ".join(["x"] * 200)
    assert degrade_prompts([short], method="random", window=window).records[0]["neg_prompts"][0].endswith(
        window.split(short)[1])


def test_random_tries_five_draws_per_prompt_as_the_official_script():
    from ddspo_fast.data.degrade import degrade_prompt

    prompts = [f"a red car number {i} parked near the old blue house" for i in range(10)]
    official = [len(degrade_prompt(p, "random", variants=10, seed=0)) for p in prompts]
    many = [len(degrade_prompt(p, "random", variants=10, seed=0, tries=200)) for p in prompts]
    assert max(official) <= 5 and min(many) == 10  # 5 draws cap the distinct variants
    # the first draws are the same either way: the option only adds draws
    for p in prompts:
        assert degrade_prompt(p, "random", variants=3, seed=0, tries=200)[:1] == \
            degrade_prompt(p, "random", variants=3, seed=0)[:1]
    with pytest.raises(ValueError, match="tries"):
        degrade_prompt(prompts[0], "random", tries=0)
