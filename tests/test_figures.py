"""Every figure README.md quotes from BENCHMARKS.md is in the BENCHMARKS.md section it links.

Each row of README's Results table, and each bullet of its Performance list that quotes a figure,
links the BENCHMARKS.md sections it comes from (`[...](BENCHMARKS.md#anchor)`, GitHub's anchor of
the heading). A section runs from its heading to the next heading of the same or a higher level.

What counts as a figure: a number standing on its own (`0.9217`, `11.2`, `1.58×`, `4,997`, `85%`),
a range (`2.24-2.67×`) and a version (`2.13.0`). `×` and `%` are not part of it; thousands commas
are, so `4,997` must be written as BENCHMARKS.md writes it. Digits inside a word or a name are
not figures: `float32`, `top-1`, `fc6`, `p50`, `1e-4`. Neither are the link's own text and anchor.
A range is found if the section writes it, or writes both of its ends (a range of two runs whose
table gives one row per run). A version is found only if the section writes all of it.

In a Results row, the figures of a machine's cell must be in the sections linked from that cell;
the figures of the first cell (what was measured: `batch 32`, `PyTorch 2.13.0`) in any section
the row links. A figure with no link beside it is an error, as is a link to no section. A figure may stand
anywhere in its section: the check catches a figure of another section or of none, not one that
swaps two cells of the same table.
"""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)*"
_FIGURE = re.compile(rf"(?<![\w.\-])(?:{_NUMBER})(?:-(?:{_NUMBER}))?(?!\w)")
_RANGE = re.compile(rf"^({_NUMBER})-({_NUMBER})$")
_LINK = re.compile(r"\[[^\]]*\]\(BENCHMARKS\.md#([^)\s]+)\)")
_ANY_LINK = re.compile(r"\[[^\]]*\]\([^)]*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def anchor(heading):
    """GitHub's anchor for a heading: lower case, inline code marks and punctuation other than
    `-` and `_` dropped, spaces turned into `-`."""
    text = _ANY_LINK.sub(lambda m: m.group(0)[1:m.group(0).index("]")], heading)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def sections(markdown):
    """{anchor: the section's text, its heading included} for every heading outside code blocks
    (a repeated heading gets `-1`, `-2`, … as on GitHub)."""
    lines = markdown.splitlines()
    headings, fenced = [], False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else _HEADING.match(line)
        if match:
            headings.append((i, len(match.group(1)), match.group(2)))
    result, seen = {}, {}
    for k, (start, level, title) in enumerate(headings):
        end = next((i for i, other, _ in headings[k + 1:] if other <= level), len(lines))
        name = anchor(title)
        if name in seen:
            seen[name] += 1
            name = f"{name}-{seen[name]}"
        else:
            seen[name] = 0
        result[name] = "\n".join(lines[start:end])
    return result


def figures(text):
    """The figures in `text`, links left out, in order."""
    return _FIGURE.findall(_ANY_LINK.sub(" ", text))


def _found(figure, written):
    if figure in written:
        return True
    ends = _RANGE.match(figure)
    return bool(ends) and ends.group(1) in written and ends.group(2) in written


def _written(text):
    """The figures a section writes, and both ends of each of its ranges."""
    written = set()
    for figure in figures(text):
        written.add(figure)
        ends = _RANGE.match(figure)
        if ends:
            written.update(ends.groups())
    return written


def unsourced(cells, benchmarks):
    """What is wrong with one row of cells (a bullet is a row of one cell): links to no section,
    figures with no link, figures missing from the sections linked. [] when nothing is."""
    row_anchors = [a for cell in cells for a in _LINK.findall(cell)]
    problems = [f"#{a} is no heading of BENCHMARKS.md" for a in row_anchors if a not in benchmarks]
    for i, cell in enumerate(cells):
        anchors = row_anchors if i == 0 else _LINK.findall(cell)
        cell_figures = figures(cell)
        if cell_figures and not anchors:
            problems.append(f"{cell.strip()!r}: figures with no BENCHMARKS.md link")
            continue
        written = _written("\n".join(benchmarks.get(a, "") for a in anchors))
        problems += [f"{figure} is not in #{', #'.join(anchors)}"
                     for figure in cell_figures if not _found(figure, written)]
    return problems


def _section_body(markdown, title):
    return markdown.split(f"\n## {title}\n")[1].split("\n## ")[0]


def results_rows(readme):
    """The cells of each row of README's Results table (header and rule left out)."""
    rows = [line.strip().strip("|").split("|")
            for line in _section_body(readme, "Results").splitlines() if line.startswith("|")]
    return rows[2:]


def performance_bullets(readme):
    """The bullets of README's Performance list, each joined into one line."""
    bullets = []
    for line in _section_body(readme, "Performance").splitlines():
        if line.startswith("* "):
            bullets.append(line[2:])
        elif bullets and line.startswith("  ") and line.strip():
            bullets[-1] += " " + line.strip()
        elif not line.strip() and bullets:
            break
    return bullets


def test_every_results_row_links_the_sections_that_hold_its_figures():
    benchmarks = sections(_read("BENCHMARKS.md"))
    rows = results_rows(_read("README.md"))
    assert len(rows) >= 5
    problems = []
    for cells in rows:
        if not _LINK.search("|".join(cells)):
            problems.append(f"{cells[0].strip()!r} links no BENCHMARKS.md section")
        problems += [f"{cells[0].strip()!r}: {p}" for p in unsourced(cells, benchmarks)]
    assert problems == []


def test_the_performance_lists_figures_are_in_the_sections_it_links():
    benchmarks = sections(_read("BENCHMARKS.md"))
    bullets = performance_bullets(_read("README.md"))
    assert len(bullets) >= 8
    problems = [f"{b[:40]!r}: {p}" for b in bullets for p in unsourced([b], benchmarks)]
    assert problems == []


def test_the_check_reports_a_figure_that_its_section_does_not_hold():
    benchmarks = sections("# B\n\n## One (AVX2)\n\n| 0.9217 | 1,038 | 31.7 | 32.9 | PyTorch 2.13.0 |\n"
                          "\n### Inside\n\n2.24-2.67×\n\n## Two\n\n0.9203\n")
    assert sorted(benchmarks) == ["b", "inside", "one-avx2", "two"]
    one = "[B](BENCHMARKS.md#one-avx2)"
    assert unsourced(["batch 32, float32", f"0.9217, 1,038, 31.7-32.9×, 2.24-2.67×, 85% {one}"],
                     benchmarks) == ["32 is not in #one-avx2", "85 is not in #one-avx2"]
    # a figure of another section, a number written another way, a version cut short
    assert unsourced(["PyTorch 2.13", f"0.9203 and 1038 {one}"], benchmarks) == [
        "2.13 is not in #one-avx2", "0.9203 is not in #one-avx2", "1038 is not in #one-avx2"]
    assert unsourced(["top-1, float32, fc6", "0.9203"], benchmarks) == [
        "'0.9203': figures with no BENCHMARKS.md link"]
    assert unsourced(["x", "0.9203 [B](BENCHMARKS.md#three)"], benchmarks) == [
        "#three is no heading of BENCHMARKS.md", "0.9203 is not in #three"]
    assert unsourced(["x", "0.9203 [B](BENCHMARKS.md#two)"], benchmarks) == []
