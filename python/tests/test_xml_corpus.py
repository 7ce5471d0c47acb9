"""validate_xml and format_xml give the CLI's verdicts, messages and output on the whole corpus
in testdata/xml (`vbackup xml validate FILE`, `vbackup xml format [--domain D] FILE`)."""

import re
import subprocess

import pytest

import vbackup_core

from conftest import REPO

CORPUS = sorted(
    path
    for kind in ("checkpoint", "backup")
    for verdict in ("valid", "invalid")
    for path in (REPO / "testdata" / "xml" / kind / verdict).glob("*.xml")
)
DOMAIN = REPO / "testdata" / "xml" / "domain" / "lab1.xml"


def test_corpus_is_there():
    assert len(CORPUS) >= 90, "testdata/xml corpus missing"


def cli(binary, *args):
    return subprocess.run([binary, *args], capture_output=True, text=True)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.name}")
def test_validate_matches_the_cli(vbackup_cli, path):
    messages = vbackup_core.validate_xml(path.read_text())
    result = cli(vbackup_cli, "xml", "validate", str(path))
    assert (result.returncode == 0) == (messages == []), result.stderr
    if path.parent.name == "valid":
        assert messages == []
    if messages:
        assert result.stderr == "".join(f"{path}:{m}\n" for m in messages)
    else:
        assert result.stdout.startswith(f"{path}: valid ")


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.name}")
def test_format_matches_the_cli(vbackup_cli, path):
    result = cli(vbackup_cli, "xml", "format", str(path))
    try:
        text = vbackup_core.format_xml(path.read_text())
    except ValueError as err:
        assert result.returncode != 0, f"the CLI formatted what Python refused: {err}"
        assert result.stderr == "".join(f"{path}:{m}\n" for m in str(err).split("\n"))
        return
    assert result.returncode == 0, result.stderr
    assert result.stdout == text


VALID = [p for p in CORPUS if p.parent.name == "valid"]


@pytest.mark.parametrize("path", VALID, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_format_aligned_with_a_domain_matches_the_cli(vbackup_cli, path):
    args = ["xml", "format", "--domain", str(DOMAIN), "--suffix", "1700000000", str(path)]
    result = cli(vbackup_cli, *args)
    try:
        text = vbackup_core.format_xml(
            path.read_text(), domain=DOMAIN.read_text(), suffix="1700000000"
        )
    except ValueError as err:
        assert result.returncode != 0, f"the CLI formatted what Python refused: {err}"
        return
    assert result.returncode == 0, result.stderr
    assert result.stdout == text


def test_format_options_leave_out_domain_and_sizes():
    embedded = re.compile(r"<domain[ >]")
    sized = re.compile(r" size='")
    checkpoints = [p for p in VALID if p.parent.parent.name == "checkpoint"]
    with_domain = next(p for p in checkpoints if embedded.search(p.read_text()))
    assert embedded.search(vbackup_core.format_xml(with_domain.read_text()))
    assert not embedded.search(vbackup_core.format_xml(with_domain.read_text(), no_domain=True))
    with_size = next(p for p in checkpoints if sized.search(p.read_text()))
    assert sized.search(vbackup_core.format_xml(with_size.read_text()))
    assert not sized.search(vbackup_core.format_xml(with_size.read_text(), no_size=True))


def test_a_domain_document_is_valid_but_has_no_canonical_form():
    text = DOMAIN.read_text()
    assert vbackup_core.validate_xml(text) == []
    with pytest.raises(ValueError, match="no canonical form"):
        vbackup_core.format_xml(text)


def test_every_error_is_one_message():
    messages = vbackup_core.validate_xml("<domainbackup><bogus/><other/></domainbackup>")
    assert len(messages) >= 1
    assert all(isinstance(m, str) and "\n" not in m for m in messages)
    assert vbackup_core.validate_xml("not xml") != []
    assert "unknown root element" in vbackup_core.validate_xml("<foo/>")[0]
