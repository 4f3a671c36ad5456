"""CITATION.cff is valid CFF 1.2.0, and the README's BibTeX and the package version agree with it."""

from __future__ import annotations

import pathlib
import re
import tomllib

import pytest
from cffconvert import Citation

ROOT = pathlib.Path(__file__).resolve().parent.parent


def citation(text: str | None = None) -> Citation:
    return Citation((ROOT / "CITATION.cff").read_text() if text is None else text)


def bibtex_entries() -> dict[str, dict[str, str]]:
    """The README's ``@type{key, field = {value}, ...}`` entries, by key (one level of braces)."""
    block = re.search(r"## Cite\n.*?```bibtex\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    entries = {}
    for key, body in re.findall(r"@\w+\{(\w+),(.*?)\n\}", block, re.S):
        fields = re.findall(r"(\w+)\s*=\s*\{((?:[^{}]|\{[^{}]*\})*)\}", body)
        entries[key] = {name: value.replace("{", "").replace("}", "") for name, value in fields}
    return entries


def test_citation_cff_is_valid_against_the_schema():
    citation().validate()  # raises jsonschema's ValidationError
    with pytest.raises(Exception, match="'titel' was unexpected"):  # the check can fail
        citation((ROOT / "CITATION.cff").read_text().replace("title:", "titel:", 1)).validate()


def test_readme_bibtex_and_version_agree_with_citation_cff():
    cff = citation().cffobj
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert cff["version"] == version
    entries = bibtex_entries()
    ours = entries["resnet_jax"]
    assert (ours["title"], ours["version"], ours["year"]) == (
        cff["title"],
        version,
        str(cff["date-released"])[:4],
    )
    papers = [e for k, e in entries.items() if k != "resnet_jax"]
    assert len(papers) == len(cff["references"]) == 2
    for ref, bib in zip(cff["references"], papers, strict=True):
        authors = " and ".join(f"{a['family-names']}, {a['given-names']}" for a in ref["authors"])
        assert (bib["title"], bib["author"], bib["year"]) == (ref["title"], authors, str(ref["year"]))
        assert (bib["booktitle"], bib["pages"]) == (ref["collection-title"], f"{ref['start']}--{ref['end']}")
        assert bib["note"] == ref["identifiers"][0]["value"]
