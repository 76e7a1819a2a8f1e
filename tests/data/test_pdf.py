"""PDF ingestion on real PDFs built with fpdf2: two-column pages, running headers, page numbers,
hyphenated line breaks; encrypted, truncated and empty files are skipped with a reason."""

import pytest

fpdf = pytest.importorskip("fpdf")

from moelab.data.pdf import PdfFilters, clean_pages, pdf_document, segment  # noqa: E402
from moelab.data.sources import load_corpus  # noqa: E402

INTRO = ["Mixture of experts models route each token to a small",
         "subset of expert networks. This keeps the compute per",
         "token low while parameter count grows.",
         "We study how routers learn during training and how the",
         "load across experts evolves over a long experi-",
         "ment with many thousands of updates."]
METHODS = ["Our setup trains a decoder with sixteen experts per",
           "layer on a corpus of research papers and measures the",
           "validation loss at every checkpoint."]
EXPECTED = [
    "Mixture of experts models route each token to a small subset of expert networks. This keeps "
    "the compute per token low while parameter count grows.",
    "We study how routers learn during training and how the load across experts evolves over a "
    "long experiment with many thousands of updates.",
    "Our setup trains a decoder with sixteen experts per layer on a corpus of research papers and "
    "measures the validation loss at every checkpoint.",
]


def _paper(path, encrypt=False):
    pdf = fpdf.FPDF()
    pdf.set_auto_page_break(False)
    pdf.set_font("Helvetica", size=10)
    pages = [(["1 Introduction", *INTRO], ["2 Methods", *METHODS]),
             (["3 Results", *METHODS], ["4 Discussion", *INTRO])]
    for number, (left, right) in enumerate(pages, 1):
        pdf.add_page()
        pdf.set_xy(10, 8)
        pdf.cell(0, 5, "Journal of Mixture Studies, Vol. 12")  # running header
        for x, lines in ((10, left), (110, right)):  # two columns
            for i, line in enumerate(lines):
                pdf.set_xy(x, 20 + 5 * i)
                pdf.cell(90, 5, line)
        pdf.set_xy(100, 280)
        pdf.cell(10, 5, f"Page {number} of 2")  # page number footer
    if encrypt:
        pdf.set_encryption(owner_password="owner", user_password="secret")
    pdf.output(str(path))
    return path


def test_two_column_paper_extracts_to_the_known_paragraphs(tmp_path):
    text, reason = pdf_document(_paper(tmp_path / "paper.pdf"))
    assert reason == ""
    assert text.split("\n\n") == [EXPECTED[0], EXPECTED[1], EXPECTED[2], EXPECTED[2], EXPECTED[0], EXPECTED[1]]
    assert "Journal" not in text and "Page" not in text
    strict, _ = pdf_document(tmp_path / "paper.pdf", PdfFilters(min_words=24))
    assert strict.split("\n\n") == [p for p in text.split("\n\n") if len(p.split()) >= 24] != []


def test_sections_ligatures_and_filters():
    # a paragraph running across a page break, page numbers between, ligature glyphs in the text
    lines = clean_pages(["2.1 Routing\nThe e\ufb03cient \ufb01lter \ufb02ows on to the\n- 3 -\n",
                         "next page without a break.\n\nShort.\nPage 4\n"])
    assert segment(lines) == [("2.1 Routing", "The efficient filter flows on to the next page without a break."),
                              ("2.1 Routing", "Short.")]
    f = PdfFilters(min_chars=10, max_chars=40, min_words=3, max_words=10, ascii_only=True)
    assert f.keep("The efficient filter flows.") and not f.keep("Short.") and not f.keep("Caf\u00e9 au lait ok")


def test_bad_pdfs_are_skipped_with_reasons(tmp_path):
    from pypdf import PdfWriter

    d = tmp_path / "pdfs"
    d.mkdir()
    _paper(d / "good.pdf")
    _paper(d / "locked.pdf", encrypt=True)
    data = (d / "good.pdf").read_bytes()
    (d / "truncated.pdf").write_bytes(data[: len(data) // 2])
    with open(d / "empty.pdf", "wb") as fh:
        PdfWriter().write(fh)
    (d / "zero.pdf").write_bytes(b"")
    corpus = load_corpus(str(d))
    assert [doc.name for doc in corpus.documents] == ["good.pdf"]
    reasons = dict(corpus.skipped)
    assert reasons["locked.pdf"] == "encrypted"
    assert reasons["empty.pdf"] == "no pages"
    assert reasons["truncated.pdf"].startswith("unreadable PDF") or reasons["truncated.pdf"] == "no text"
    assert reasons["zero.pdf"].startswith("unreadable PDF")


def test_data_prepare_pdf_filter_flags(tmp_path):
    """`data prepare --pdf-*` reach the PDF filters: the known paragraphs pass the defaults, a word
    floor above their length drops them all (the paper is then skipped with the reason)."""
    import json
    import subprocess
    import sys

    d = tmp_path / "papers"
    d.mkdir()
    for i in range(3):
        _paper(d / f"p{i}.pdf")
    (d / "notes.txt").write_text("plain notes about experts and routers, kept whatever the PDF filters say " * 5)

    def run(*flags):
        out = tmp_path / f"prep{len(flags)}"
        res = subprocess.run([sys.executable, "-m", "moelab", "data", "prepare", str(d), "--out", str(out),
                              "--vocab-size", "300", "--val-fraction", "0.3", *flags], capture_output=True, text=True)
        return res, out

    res, out = run()
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert sum(s["documents"] for s in m["splits"].values()) == 4 and not m["skipped"]
    res, out = run("--pdf-min-words", "40", "--pdf-max-words", "400")
    assert res.returncode == 2 and "need at least 2" in res.stderr  # only notes.txt is left
    res, out = run("--pdf-min-words", "20", "--pdf-max-words", "30", "--pdf-ascii-only")
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert sum(s["documents"] for s in m["splits"].values()) == 4  # 21-26 words: every paragraph kept
    res, out = run("--pdf-max-chars", "100")
    assert res.returncode == 2


def test_damaged_pdfs_are_reported_in_the_manifest_not_as_pypdf_log_lines(tmp_path):
    """pypdf logged its own warning for each damaged PDF ("EOF marker not found") to stderr, beside
    moelab's progress lines: a folder of thousands of PDFs buried them."""
    import json
    import subprocess
    import sys

    d = tmp_path / "papers"
    d.mkdir()
    _paper(d / "good.pdf")
    (d / "cut.pdf").write_bytes(b"%PDF-1.4 and then nothing")
    (d / "notes.txt").write_text("plain notes about experts and routers " * 5)
    res = subprocess.run([sys.executable, "-m", "moelab", "data", "prepare", str(d), "--out", str(tmp_path / "out"),
                          "--vocab-size", "300", "--val-fraction", "0.3"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "EOF marker" not in res.stderr and "pypdf" not in res.stderr, res.stderr
    skipped = json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"]
    assert [s["name"] for s in skipped] == ["cut.pdf"] and skipped[0]["reason"].startswith("unreadable PDF")
