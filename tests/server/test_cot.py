"""Staged-answer parsing: the model's real tag format, the seed's line format, and every way they break."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamactl.server.cot import StagedAnswer, parse_staged, split_steps

FULL = (
    "<SUMMARY>I will describe the image.</SUMMARY>"
    "<CAPTION>A red square on white.</CAPTION>"
    "<REASONING>1. The shape has four equal sides.\n2. Its colour is red.</REASONING>"
    "<CONCLUSION>It is a red square.</CONCLUSION>"
)


def _tuple(a: StagedAnswer) -> tuple[str, str, list[str], str]:
    return (a.summary, a.caption, a.reasoning, a.conclusion)


CASES: list[tuple[str, str, tuple[str, str, list[str], str]]] = [
    (
        "full",
        FULL,
        (
            "I will describe the image.",
            "A red square on white.",
            ["The shape has four equal sides.", "Its colour is red."],
            "It is a red square.",
        ),
    ),
    (
        "newlines and spaces between and inside tags",
        (
            "<SUMMARY>\n  S  \n</SUMMARY>\n\n<CAPTION>\nC\n</CAPTION>\n<REASONING>\nR.\n</REASONING>\n"
            "<CONCLUSION>\n  The answer is B.\n</CONCLUSION>\n"
        ),
        ("S", "C", ["R."], "The answer is B."),
    ),
    (
        "case and spaces inside brackets",
        "<summary>s</Summary>< Caption >c</ CAPTION ><Reasoning>r.</reasoning><conclusion>done</ conclusion>",
        ("s", "c", ["r."], "done"),
    ),
    (
        "no tags: whole text is the conclusion",
        "  Just a plain answer.\n",
        ("", "", [], "Just a plain answer."),
    ),
    ("empty", "", ("", "", [], "")),
    ("only whitespace", " \n\t ", ("", "", [], "")),
    (
        "cut by max_tokens inside reasoning keeps the partial text",
        "<SUMMARY>s</SUMMARY><CAPTION>c</CAPTION><REASONING>1. first step\n2. second st",
        ("s", "c", ["first step", "second st"], ""),
    ),
    (
        "cut inside conclusion keeps partial conclusion",
        "<SUMMARY>s</SUMMARY><CONCLUSION>The answer is",
        ("s", "", [], "The answer is"),
    ),
    (
        "cut inside a closing tag",
        "<SUMMARY>s</SUMMARY><CAPTION>a cat</CAP",
        ("s", "a cat", [], ""),
    ),
    (
        "cut inside an opening tag",
        "<SUMMARY>s</SUMMARY><CONCL",
        ("s", "", [], ""),
    ),
    (
        "a trailing '<' that cannot start a stage tag is kept",
        "<SUMMARY>s</SUMMARY><CONCLUSION>x <b",
        ("s", "", [], "x <b"),
    ),
    (
        "missing stages",
        "<CAPTION>c</CAPTION><CONCLUSION>x</CONCLUSION>",
        ("", "c", [], "x"),
    ),
    (
        "out of order",
        "<CONCLUSION>x</CONCLUSION><REASONING>r.</REASONING><SUMMARY>s</SUMMARY><CAPTION>c</CAPTION>",
        ("s", "c", ["r."], "x"),
    ),
    (
        "repeated: the last complete occurrence wins",
        "<SUMMARY>first</SUMMARY><SUMMARY>second</SUMMARY><CONCLUSION>a</CONCLUSION><CONCLUSION>b</CONCLUSION>",
        ("second", "", [], "b"),
    ),
    (
        "repeated: a later partial does not replace a complete one",
        "<CONCLUSION>final</CONCLUSION><CONCLUSION>restarted but cut",
        ("", "", [], "final"),
    ),
    (
        "unclosed stage ends at the next opening tag",
        "<SUMMARY>s<CAPTION>c</CAPTION><CONCLUSION>x</CONCLUSION>",
        ("s", "c", [], "x"),
    ),
    (
        "closing tag without opening takes the text before it",
        "the summary</SUMMARY><CONCLUSION>x</CONCLUSION>",
        ("the summary", "", [], "x"),
    ),
    (
        "text outside tags is ignored; trailing text is the conclusion when there is no CONCLUSION",
        "Sure! <SUMMARY>s</SUMMARY> and then\nThe answer is 4.",
        ("s", "", [], "and then\nThe answer is 4."),
    ),
    (
        "text outside tags ignored when CONCLUSION exists",
        "Preamble <SUMMARY>s</SUMMARY> middle <CONCLUSION>x</CONCLUSION> trailing",
        ("s", "", [], "x"),
    ),
    (
        "angle brackets that are not stage tags stay in the text",
        "<CONCLUSION>x < y and <b>bold</b></CONCLUSION>",
        ("", "", [], "x < y and <b>bold</b>"),
    ),
    (
        "seed line format",
        "SUMMARY: s line\nCAPTION: c line\nREASONING: Step 1: look.\nStep 2: think.\nCONCLUSION: yes",
        ("s line", "c line", ["look.", "think."], "yes"),
    ),
    (
        "line format in markdown and mixed case",
        "**Summary:** s\n\n## Caption: c\n\nReasoning:\n- a\n- b\n\n**Conclusion**: the end\n",
        ("s", "c", ["a", "b"], "the end"),
    ),
    (
        "line format: repeated header, last wins",
        "Conclusion: maybe\nConclusion: surely",
        ("", "", [], "surely"),
    ),
    (
        "a word 'conclusion' mid-line is not a header",
        "In conclusion: it rains.",
        ("", "", [], "In conclusion: it rains."),
    ),
    (
        "tags win over line headers",
        "SUMMARY: ignored\n<CONCLUSION>tagged</CONCLUSION>",
        ("", "", [], "tagged"),
    ),
]


@pytest.mark.parametrize(("name", "text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_parse_staged(name: str, text: str, expected: tuple[str, str, list[str], str]) -> None:
    assert _tuple(parse_staged(text)) == expected


def test_truncated_flag() -> None:
    assert parse_staged("<SUMMARY>s</SUMMARY><REASONING>1. a").truncated
    assert not parse_staged(FULL).truncated
    assert not parse_staged("no tags").truncated


def test_to_dict_is_the_api_result_shape() -> None:
    d = parse_staged(FULL).to_dict()
    assert d == {
        "summary": "I will describe the image.",
        "caption": "A red square on white.",
        "reasoning": ["The shape has four equal sides.", "Its colour is red."],
        "conclusion": "It is a red square.",
    }


STEP_CASES: list[tuple[str, str, list[str]]] = [
    ("numbered dot", "1. a\n2. b\n3. c", ["a", "b", "c"]),
    ("numbered paren", "1) a\n2) b", ["a", "b"]),
    ("step labels", "Step 1: look\nStep 2: count", ["look", "count"]),
    ("bold step labels", "**Step 1:** look\n**Step 2:** count", ["look", "count"]),
    ("bullets", "- a\n* b\n\u2022 c", ["a", "b", "c"]),
    (
        "continuation lines join the step",
        "1. first\n   more of first\n2. second",
        ["first more of first", "second"],
    ),
    ("preamble before the first marker is a step", "Let me think.\n1. a\n2. b", ["Let me think.", "a", "b"]),
    (
        "paragraphs",
        "First part here.\n\nSecond part, longer.\n\n\nThird.",
        ["First part here.", "Second part, longer.", "Third."],
    ),
    (
        "sentences",
        "The sky is blue. It is noon! Is it hot? Yes.",
        ["The sky is blue.", "It is noon!", "Is it hot?", "Yes."],
    ),
    (
        "decimal numbers are not markers",
        "It weighs 1.5 kg. That is light.",
        ["It weighs 1.5 kg.", "That is light."],
    ),
    ("single sentence", "Only one step", ["Only one step"]),
    ("empty", "   ", []),
    ("empty markers dropped", "1.\n2. b", ["b"]),
]


@pytest.mark.parametrize(("name", "text", "expected"), STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_split_steps(name: str, text: str, expected: list[str]) -> None:
    assert split_steps(text) == expected


# --- properties -------------------------------------------------------------------------------------------------

_PIECES = st.sampled_from(
    [
        "<SUMMARY>",
        "</SUMMARY>",
        "<CAPTION>",
        "</CAPTION>",
        "<REASONING>",
        "</REASONING>",
        "<CONCLUSION>",
        "</CONCLUSION>",
        "< summary >",
        "</ Conclusion>",
        "SUMMARY:",
        "\nCONCLUSION:",
        "\n1. ",
        "\nStep 2:",
        "\n- ",
        "\n\n",
        ". ",
        "<",
        ">",
        "/",
        " ",
        "word",
        "**",
        "#",
    ]
)
_TEXTS = st.one_of(st.text(), st.lists(st.one_of(_PIECES, st.text(max_size=5)), max_size=40).map("".join))


@settings(max_examples=400, deadline=None)
@given(_TEXTS)
def test_never_raises_and_returns_clean_fields(text: str) -> None:
    answer = parse_staged(text)
    for value in (answer.summary, answer.caption, answer.conclusion, *answer.reasoning):
        assert isinstance(value, str)
        assert value == value.strip()
    assert all(answer.reasoning)  # no empty steps
    assert set(answer.to_dict()) == {"summary", "caption", "reasoning", "conclusion"}


@settings(max_examples=200, deadline=None)
@given(st.text().filter(lambda t: "<" not in t and ":" not in t))
def test_plain_text_is_the_conclusion(text: str) -> None:
    assert parse_staged(text) == StagedAnswer(conclusion=text.strip())


_CONTENT = st.text(
    alphabet=st.characters(exclude_characters="<>", exclude_categories=["Cs"]), min_size=1, max_size=30
).filter(lambda t: t.strip() != "")


@settings(max_examples=200, deadline=None)
@given(_CONTENT, _CONTENT, _CONTENT)
def test_well_formed_stages_round_trip(summary: str, caption: str, conclusion: str) -> None:
    text = f"<SUMMARY>{summary}</SUMMARY><CAPTION>{caption}</CAPTION><CONCLUSION>{conclusion}</CONCLUSION>"
    answer = parse_staged(text)
    assert (answer.summary, answer.caption, answer.conclusion) == (
        summary.strip(),
        caption.strip(),
        conclusion.strip(),
    )


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(FULL)))
def test_any_prefix_of_a_full_answer_parses_in_order(cut: int) -> None:
    """What max_tokens does: every prefix parses, and stages fill in order as the text grows."""
    answer = parse_staged(FULL[:cut])
    full = parse_staged(FULL)
    if answer.conclusion and cut > FULL.index("<CONCLUSION>"):
        assert full.conclusion.startswith(answer.conclusion)
    if cut >= FULL.index("<CAPTION>"):
        assert answer.summary == full.summary
    if cut == len(FULL):
        assert answer == full


PATHOLOGICAL = [
    "<" + " " * 50_000 + "x!",
    "<" + " " * 50_000 + "/" + " " * 50_000 + "q",
    "a\n" + " " * 50_000 + "x",
    ("<" + " " * 50) * 4000,
    ("\n**" + " " * 50 + "summary" + " " * 50 + "**" + " " * 30) * 1000,
    ("\n#" + " " * 50 + "**" + " " * 50) * 2000,
    "<REASONING>" + ("1." + " " * 200 + "x\n") * 1000,
    "<SUMMARY>" * 20_000,
]


@pytest.mark.parametrize("text", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_linear_time_on_hostile_whitespace(text: str) -> None:
    import time

    start = time.perf_counter()
    parse_staged(text)
    assert time.perf_counter() - start < 1.0  # quadratic backtracking would take minutes
