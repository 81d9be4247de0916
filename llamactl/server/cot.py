"""Parse the model's staged (chain-of-thought) answer into summary, caption, reasoning steps and conclusion.

Llama-3.2V-11B-cot writes plain-text tags: ``<SUMMARY>..</SUMMARY><CAPTION>..</CAPTION><REASONING>..</REASONING>
<CONCLUSION>..</CONCLUSION>``. Real outputs break that shape: answers cut by ``max_tokens`` leave a stage open,
sampling repeats or reorders stages, tags change case or gain spaces. The rules, in order:

- Tags anywhere (any case, spaces inside the brackets allowed) are used when present. A stage left open runs to
  the next tag or the end of the text, so a cut answer keeps its partial text (``truncated`` is then True);
  a tag cut in half at the very end (``</CAPT``) is dropped.
  A closing tag with no opening one takes the text since the previous tag.
- A stage that occurs more than once: the **last complete** occurrence wins (a model that restates a stage is
  revising it; joining would duplicate text); if none is complete, the last partial one.
- Without tags, the line format of the seed article (``SUMMARY: ...`` lines, also ``**Summary:**`` or
  ``## Summary:``) is used when it names at least one stage.
- With neither, the whole text (stripped) is the conclusion.
- With stages but no CONCLUSION, text after the last stage (outside any tag) is the conclusion.
- Reasoning is split into steps by numbered lines (``1.``, ``2)``, ``Step 3:``) or bullets; else by paragraphs;
  else by sentences. Markers are removed and whitespace inside a step is collapsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

STAGES = ("summary", "caption", "reasoning", "conclusion")

# Each pattern is written so that no two repeats can match the same characters (no ``\s*/?\s*``): model
# output with long runs of spaces must not cause quadratic backtracking.
_TAG = re.compile(r"<\s*(?:(/)\s*)?(summary|caption|reasoning|conclusion)\s*>", re.IGNORECASE)
_LINE_HEADER = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]*)?(?:[*_]{1,2}[ \t]*)?(summary|caption|reasoning|conclusion)"
    r"[ \t]*(?:[*_]{1,2}[ \t]*)?:[ \t]*(?:[*_]{1,2})?",
    re.IGNORECASE | re.MULTILINE,
)
_STEP_MARKER = re.compile(  # at a line start, optionally in markdown bold: "1." "2)" "Step 3:" "-" "*" "•"
    r"^[ \t]*[*_]{0,2}(?:step[ \t]*\d{1,3}[ \t]*[:.)\-]?|\d{1,3}[.)](?=\s)|[-*\u2022](?=\s))[*_]{0,2}[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)
_PARTIAL_TAG_AT_END = re.compile(r"<[ \t]*(?:/[ \t]*)?(?:([a-z]{1,10})[ \t]*)?$", re.IGNORECASE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class StagedAnswer:
    """The four stages of an answer; empty strings (or an empty list) for stages the model did not write."""

    summary: str = ""
    caption: str = ""
    reasoning: list[str] = field(default_factory=list)
    conclusion: str = ""
    truncated: bool = False  # a stage was still open when the text ended (e.g. cut by max_tokens)

    def to_dict(self) -> dict[str, object]:
        """The API's ``result`` object: summary, caption, reasoning (list of steps), conclusion."""
        return {
            "summary": self.summary,
            "caption": self.caption,
            "reasoning": list(self.reasoning),
            "conclusion": self.conclusion,
        }


@dataclass
class _Found:
    text: str
    complete: bool


def parse_staged(text: str) -> StagedAnswer:
    """Parse a model answer; never raises on any string."""
    found, tail, truncated = _from_tags(text)
    if not found:
        found, tail = _from_lines(text)
        truncated = False
    if not found:
        return StagedAnswer(conclusion=text.strip())
    chosen = {stage: _choose(found.get(stage, [])) for stage in STAGES}
    conclusion = chosen["conclusion"] if "conclusion" in found else tail.strip()
    return StagedAnswer(
        summary=chosen["summary"],
        caption=chosen["caption"],
        reasoning=split_steps(chosen["reasoning"]),
        conclusion=conclusion,
        truncated=truncated,
    )


def _choose(occurrences: list[_Found]) -> str:
    complete = [o for o in occurrences if o.complete]
    pick = complete[-1] if complete else (occurrences[-1] if occurrences else None)
    return pick.text.strip() if pick else ""


def _from_tags(text: str) -> tuple[dict[str, list[_Found]], str, bool]:
    """Stages from ``<TAG>`` markup; also the untagged text after the last tag."""
    found: dict[str, list[_Found]] = {}
    open_stage: str | None = None
    start = 0  # where the open stage's text (or the untagged run) begins
    for match in _TAG.finditer(text):
        closing, stage = match.group(1) == "/", match.group(2).lower()
        if open_stage is not None:
            # Text up to here belongs to the open stage; it is complete only if this tag closes it.
            done = closing and stage == open_stage
            found.setdefault(open_stage, []).append(_Found(text[start : match.start()], done))
            open_stage = None
        elif closing:
            # A closing tag without its opening one: take the untagged text since the previous tag.
            found.setdefault(stage, []).append(_Found(text[start : match.start()], True))
        if not closing:
            open_stage = stage
        start = match.end()
    rest = _drop_partial_tag(text[start:])
    if open_stage is not None:
        found.setdefault(open_stage, []).append(_Found(rest, False))
        return found, "", True
    return found, rest if found else "", False


def _drop_partial_tag(text: str) -> str:
    """Remove a stage tag cut off at the very end (``...</CAP``), as max_tokens leaves it."""
    window = max(0, len(text) - 32)  # a cut tag is short; never scan the whole text
    match = _PARTIAL_TAG_AT_END.search(text, window)
    if match and any(stage.startswith((match.group(1) or "").lower()) for stage in STAGES):
        return text[: match.start()]
    return text


def _from_lines(text: str) -> tuple[dict[str, list[_Found]], str]:
    """Stages from ``SUMMARY: ...`` header lines, each running to the next header."""
    headers = list(_LINE_HEADER.finditer(text))
    found: dict[str, list[_Found]] = {}
    for i, match in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        found.setdefault(match.group(1).lower(), []).append(_Found(text[match.end() : end], True))
    return found, ""


def split_steps(reasoning: str) -> list[str]:
    """Split reasoning text into steps: numbered/bulleted lines, else paragraphs, else sentences."""
    text = reasoning.strip()
    if not text:
        return []
    markers = list(_STEP_MARKER.finditer(text))
    if markers:
        pieces = [text[: markers[0].start()]]
        for i, match in enumerate(markers):
            end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
            pieces.append(text[match.end() : end])
    elif _PARAGRAPH_BREAK.search(text):
        pieces = _PARAGRAPH_BREAK.split(text)
    else:
        pieces = _SENTENCE_END.split(text)
    steps = [_SPACES.sub(" ", p).strip() for p in pieces]
    return [s for s in steps if s]
