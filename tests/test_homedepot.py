"""The Home Depot adapter on a tiny latin-1 sample written by the test (the real file is never committed)."""
import csv
import zipfile

import pytest

from components.ingest.readers import InputError
from pipeline import homedepot

SAMPLE = [
    ("2", "100001", "Simpson Strong-Tie 12-Gauge Angle", "angle bracket", "3"),
    ("3", "100001", "Simpson Strong-Tie 12-Gauge Angle", "l bracket", "2.5"),
    ("16", "100005", "Delta Vero 1-Handle Shower Faucet Trim Kit in Chrome (Valve Not Included)", "rain shower head", "2.33"),
    ("17", "100007", "Café Lighting 2-Light Pendant, 9½ in.", "pendant light", "1.67"),
    ("18", "100009", "Title with a\nline break", "ceiling fan", "2"),
]


def write_sample(path, rows=SAMPLE, header=("id", "product_uid", "product_title", "search_term", "relevance")):
    with open(path, "w", encoding="latin-1", newline="") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_ALL)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def read(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("zipped", [False, True])
def test_converts_to_logs_and_judgments(tmp_path, zipped):
    source = write_sample(tmp_path / "train_dev.csv")
    if zipped:
        archive = tmp_path / "train_dev.csv.zip"
        with zipfile.ZipFile(archive, "w") as z:
            z.write(source, "train_dev.csv")
        source = str(archive)
    made = homedepot.convert(source, str(tmp_path / "out"))
    assert made["rows"] == len(SAMPLE)
    logs, judgments = read(made["logs"]), read(made["judgments"])
    assert [(r["query"], r["item_id"], r["impressions"], r["clicks"]) for r in logs] == [
        (q, uid, "1", "0") for _, uid, _, q, _ in SAMPLE]
    assert [(r["query"], r["item_id"], r["relevance"]) for r in judgments] == [(q, uid, rel) for _, uid, _, q, rel in SAMPLE]
    # latin-1 characters survive into the UTF-8 output; fields never span lines.
    assert logs[3]["item_title"] == "Café Lighting 2-Light Pendant, 9½ in."
    assert logs[4]["item_title"] == "Title with a line break"
    assert judgments[0]["item_title"] == SAMPLE[0][2]


def test_broken_rows_are_passed_through_for_quarantine(tmp_path):
    source = write_sample(tmp_path / "hd.csv", rows=SAMPLE[:1] + [("9", "100010", "Short row")])
    made = homedepot.convert(source, str(tmp_path / "out"))
    judgments = read(made["judgments"])
    assert made["rows"] == 2 and judgments[1]["query"] == "" and judgments[1]["relevance"] == ""


def test_wrong_file_is_a_clear_error(tmp_path):
    source = write_sample(tmp_path / "other.csv", header=("id", "title", "query", "score", "x"))
    with pytest.raises(InputError, match="product_uid"):
        homedepot.convert(source, str(tmp_path / "out"))
    with pytest.raises(InputError, match="not found"):
        homedepot.convert(str(tmp_path / "absent.csv"), str(tmp_path / "out"))
