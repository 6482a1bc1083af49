"""TrainConfig.from_yaml / from_dict: YAML 1.1 words, kebab-case keys, overrides, and
one clear error per bad file."""

import pytest

from ddspo_fast.train import TrainConfig


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("word, expected", [("no", "no"), ("off", "no"), ("false", "no"), ("'no'", "no"),
                                            ("bf16", "bf16")])
def test_yaml_1_1_booleans_read_as_the_choice_word(tmp_path, word, expected):
    # YAML 1.1 reads `no` / `off` / `false` as False; mixed_precision's choices include "no"
    assert TrainConfig.from_yaml(write(tmp_path, f"mixed_precision: {word}\n")).mixed_precision == expected


def test_a_bool_is_not_a_choice_without_that_word(tmp_path):
    with pytest.raises(ValueError, match="^objective:"):
        TrainConfig.from_yaml(write(tmp_path, "objective: no\n"))
    with pytest.raises(ValueError, match="^mixed_precision:"):  # no "yes" among its choices
        TrainConfig.from_yaml(write(tmp_path, "mixed_precision: yes\n"))


def test_kebab_keys_overrides_and_empty_file(tmp_path):
    p = write(tmp_path, "lora-rank: 4\nbeta: -1\nmax_steps: 9\n")
    c = TrainConfig.from_yaml(p, overrides={"beta": 7.0, "max-steps": 3})
    assert (c.lora_rank, c.beta, c.max_steps) == (4, 7.0, 3)
    assert TrainConfig.from_yaml(write(tmp_path, "")) == TrainConfig()
    assert TrainConfig.from_dict({"learning-rate": 1e-4}).learning_rate == 1e-4


@pytest.mark.parametrize("text, match", [
    ("beta: [1,\n", r"c\.yaml: not valid YAML \(line 2"),
    ("- a\n- b\n", r"c\.yaml: expected a mapping of field names to values, got list"),
    ("betta: 1\n", r"^betta: unknown config field \(did you mean 'beta'\?\)"),
    ("zzz: 1\n", r"^zzz: unknown config field \(known: model, data, "),
    ("seed: 1\nseed: 2\n", r"c\.yaml: line 2: seed: given twice"),  # YAML lets the last win
    ("lora_rank: 1\nlora-rank: 2\n", r"^lora_rank: given twice"),
])
def test_bad_files_raise_one_clear_error(tmp_path, text, match):
    p = write(tmp_path, text)
    if match is None:
        assert TrainConfig.from_yaml(p).seed == 2
        return
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_yaml(p)


def test_fields_help_lists_choices():
    h = TrainConfig.fields_help()
    assert h["mixed_precision"]["choices"] == ("auto", "bf16", "fp16", "no")
    assert "sd15" in h["family"]["choices"] and h["beta"]["choices"] is None
