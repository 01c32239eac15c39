"""Answer parsing and metrics against hand-computed values."""

from decimal import Decimal

import pytest

from finlora.metrics import (
    TaskKind,
    extract_answer,
    parse_label,
    parse_number,
    rouge_l_f1,
    score,
    weighted_f1,
)

SENTIMENT = ["negative", "neutral", "positive"]
# The exact strings of nwgi_test.jsonl's targets.
NWGI = [
    "strong negative",
    "moderately negative",
    "mildly negative",
    "neutral",
    "mildly positive",
    "moderately positive",
    "strong positive",
]


# --- parse_label ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("negative, not positive", "negative"),
        ("positive or negative", "positive"),
        ("The sentiment is neutral.", "neutral"),
        ("It is positively received", "positive"),  # plain substring, as FinLoRA
    ],
)
def test_first_label_in_the_text_wins(text: str, expected: str) -> None:
    assert parse_label(text, SENTIMENT) == expected


@pytest.mark.parametrize("text", ["", "I cannot tell.", "bullish", "neg"])
def test_unparsable_answers_give_none(text: str) -> None:
    assert parse_label(text, SENTIMENT) is None


def test_case_insensitive_and_returns_the_label_as_spelled() -> None:
    assert parse_label("NEUTRAL", SENTIMENT) == "neutral"
    assert parse_label("neutral", ["Negative", "Neutral", "Positive"]) == "Neutral"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mildly positive", "mildly positive"),
        ("Moderately Negative", "moderately negative"),
        ("strong positive sentiment", "strong positive"),
        ("The news is mildly negative for the stock", "mildly negative"),
        ("neutral", "neutral"),
    ],
)
def test_nwgi_multi_word_labels(text: str, expected: str) -> None:
    assert parse_label(text, NWGI) == expected
    assert parse_label(text, NWGI[::-1]) == expected  # label order must not matter


def test_nested_label_does_not_beat_the_longer_match() -> None:
    labels = [*SENTIMENT, *NWGI]
    for ordering in (labels, labels[::-1]):
        # "positive" occurs inside "mildly positive" but starts later.
        assert parse_label("mildly positive", ordering) == "mildly positive"
        assert parse_label("strong negative", ordering) == "strong negative"
        # Same start: the longest label wins.
        assert parse_label("positive", ["positive", "positive outlook"]) == "positive"
        assert parse_label("positive outlook", ["positive", "positive outlook"]) == "positive outlook"
        # A plain label written before a multi-word one still wins by position.
        assert parse_label("positive, or mildly positive", ordering) == "positive"


# --- label metrics -------------------------------------------------------------------------------


def test_label_metrics_against_hand_computed_values() -> None:
    references = ["positive", "positive", "positive", "negative", "negative", "neutral"]
    generations = ["positive", "Positive.", "Negative!", "negative", "I think so", "neutral"]
    # parsed:        positive    positive     negative    negative    (none)        neutral
    # correct:       yes         yes          no          yes         no            yes      -> 4/6
    got = score(TaskKind.label, generations, references, SENTIMENT)
    assert got["n"] == 6
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["unparsable_rate"] == pytest.approx(1 / 6)
    # FinLoRA's f1: responses = pos, pos, "negative!", neg, "i think so", neu
    #   positive: tp 2, predicted 2, true 3 -> P 1,   R 2/3 -> F1 0.8
    #   negative: tp 1, predicted 1, true 2 -> P 1,   R 1/2 -> F1 2/3
    #   neutral:  tp 1, predicted 1, true 1                 -> F1 1
    #   weighted: (3*0.8 + 2*2/3 + 1*1) / 6
    assert got["f1"] == pytest.approx((3 * 0.8 + 2 * 2 / 3 + 1) / 6)
    # f1_parsed: predictions = pos, pos, neg, neg, unparsable, neu
    #   negative now has 2 predicted (the wrong "Negative!" counts against it) -> P 1/2, R 1/2 -> F1 1/2
    #   weighted: (3*0.8 + 2*0.5 + 1*1) / 6
    assert got["f1_parsed"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1) / 6)


def test_wrong_answer_that_is_exactly_a_label_counts_against_that_label_as_in_finlora() -> None:
    # refs pos, neg; both answered "negative": positive F1 0; negative P 1/2, R 1 -> 2/3; weighted 1/3.
    got = score(TaskKind.label, ["negative", "negative"], ["positive", "negative"], SENTIMENT)
    assert got["accuracy"] == 0.5
    assert got["f1"] == pytest.approx(1 / 3)
    assert got["f1_parsed"] == pytest.approx(1 / 3)


def test_label_metrics_on_nwgi_and_perfect_answers() -> None:
    references = ["mildly positive", "strong negative", "neutral"]
    got = score("label", ["Mildly positive", "strong negative.", "neutral"], references, NWGI)
    assert got == {"accuracy": 1.0, "f1": 1.0, "f1_parsed": 1.0, "unparsable_rate": 0.0, "n": 3.0}
    # "positive" alone is not an NWGI label: unparsable, not a near miss.
    wrong = score(TaskKind.label, ["positive"], ["mildly positive"], NWGI)
    assert wrong["accuracy"] == 0.0 and wrong["unparsable_rate"] == 1.0 and wrong["f1"] == 0.0


def test_weighted_f1_ignores_prediction_only_classes_in_the_weights() -> None:
    # true a,a,b ; pred a,x,b: a P 1 R 1/2 -> 2/3; b -> 1; x has no support. (2*2/3 + 1) / 3
    assert weighted_f1(["a", "a", "b"], ["a", "x", "b"]) == pytest.approx((2 * 2 / 3 + 1) / 3)


# --- numeric -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234.567", "1234.57"),
        ("$12.5", "12.50"),
        ("-3", "-3.00"),
        ("The answer is 0.125", "0.13"),  # half-up, unlike round(0.125, 2) == 0.12
        ("2.675", "2.68"),  # float round() would give 2.67
        ("-$4.5 million", "-4.50"),
        ("12,345,678", "12345678.00"),
        ("1,2,3", "1.00"),
        ("from 2023-2024", "2023.00"),
        ("about .5", "0.50"),
    ],
)
def test_parse_number(text: str, expected: str) -> None:
    assert parse_number(text) == Decimal(expected)


def test_numeric_exact_match_after_rounding() -> None:
    generations = ["1,234.567", "$12.5", "-3", "The answer is 0.1249", "I don't know"]
    references = ["1234.57", "12.50", "3.00", "0.12", "5"]
    # correct:     yes         yes      no (sign)  yes (0.12)            no (unparsable)
    got = score(TaskKind.numeric, generations, references)
    assert got == {"accuracy": pytest.approx(3 / 5), "unparsable_rate": pytest.approx(1 / 5), "n": 5.0}


# --- tags ----------------------------------------------------------------------------------------


def test_tags_accuracy_with_missing_and_extra_tags() -> None:
    generations = ["A, b ,X", "E,F,G,H", "GoodwillImpairmentLoss"]
    references = ["A,B,C,D", "E,F", "Goodwill"]
    # example 1: A ok, b ok (case), X wrong, D missing -> 2 of 4
    # example 2: E ok, F ok, G and H dropped          -> 2 of 2
    # example 3: a longer tag is not the reference tag -> 0 of 1   total 4 of 7
    got = score(TaskKind.tags, generations, references)
    assert got == {"accuracy": pytest.approx(4 / 7), "n": 3.0, "n_entities": 7.0}


# --- text ----------------------------------------------------------------------------------------


def test_rouge_l_on_identical_disjoint_and_partial_strings() -> None:
    assert rouge_l_f1("Amount of goodwill.", "amount of GOODWILL") == 1.0
    assert rouge_l_f1("cash flow", "deferred revenue") == 0.0
    # LCS of [the cat sat on the mat] and [the cat is on the mat] is 5 tokens: P = R = 5/6.
    assert rouge_l_f1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # Order matters: LCS 1 of 2 tokens each way -> 1/2.
    assert rouge_l_f1("b a", "a b") == pytest.approx(0.5)
    # P = 2/2, R = 2/4 -> 2/3.
    assert rouge_l_f1("net income", "net income before taxes") == pytest.approx(2 / 3)
    assert rouge_l_f1("", "") == 1.0
    assert rouge_l_f1("", "1832") == 0.0


def test_text_score_is_the_mean_rouge_l() -> None:
    got = score(TaskKind.text, ["Amount of goodwill", "yes"], ["amount of goodwill", "no"])
    assert got == {"rouge_l_f1": 0.5, "n": 2.0}


# --- extract_answer and errors -------------------------------------------------------------------


def test_extract_answer() -> None:
    assert extract_answer(TaskKind.label, "Mildly Positive!", NWGI) == "mildly positive"
    assert extract_answer(TaskKind.label, "no idea", SENTIMENT) == "unparsable"
    assert extract_answer(TaskKind.numeric, "It is $1,234.567", None) == "1234.57"
    assert extract_answer(TaskKind.numeric, "none", None) == "unparsable"
    assert extract_answer(TaskKind.tags, " A, B\n,C ", None) == "A,B,C"
    assert extract_answer(TaskKind.text, "  An amount.\n", None) == "An amount."


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        score(TaskKind.text, ["a"], ["a", "b"])
    with pytest.raises(ValueError):
        score(TaskKind.text, [], [])
    with pytest.raises(ValueError):
        score(TaskKind.label, ["positive"], ["positive"])
    with pytest.raises(ValueError):
        score(TaskKind.numeric, ["1"], ["n/a"])
