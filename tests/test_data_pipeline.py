import gzip
import json

import pytest

from afm.data.document import Document, read_jsonl, write_jsonl
from afm.data.pipeline import CurateConfig, curate, stage_profile
from afm.errors import AFMError

SENTENCES = [
    "The printing press changed how ideas travelled across Europe in the fifteenth century.",
    "Rivers shaped the first cities, which grew where water and trade met.",
    "A good bread needs time, warmth and patience more than any special flour.",
    "Astronomers measured the distance to the Sun long before telescopes were precise.",
    "Libraries kept copies of rare manuscripts safe through wars and fires.",
    "Bees communicate the direction of flowers with a dance inside the hive.",
    "The first railways carried coal before they ever carried passengers.",
    "Mountains create their own weather, catching clouds on their western slopes.",
    "Children learn languages by listening long before they start to speak.",
    "Glass was once so valuable that windows were taken along when families moved.",
    "Maps of the old world left empty spaces where travellers had not yet been.",
    "Salt preserved food for sailors on voyages that lasted many months.",
    "Clocks in town squares set the rhythm of work for whole communities.",
    "Paper money began as receipts for coins stored with trusted merchants.",
    "Forests recover after fires as new seeds wait for the heat to open them.",
    "Music notation let composers share melodies with musicians they never met.",
    "The compass pointed north long before anyone understood magnetism.",
    "Early doctors learned much by carefully describing what they observed.",
    "Canals joined rivers and let heavy goods move cheaply between regions.",
    "Telescopes revealed moons around Jupiter and changed ideas about the heavens.",
    "Weavers used punched cards to control patterns, an idea later used by computers.",
    "Gardens in monasteries grew herbs that monks used as medicine.",
    "Lighthouses guided ships along coasts where rocks hid under the waves.",
    "Newspapers spread quickly once steam presses could print thousands of pages an hour.",
]


def text(seed: int, n: int = 9) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.sample(SENTENCES, n))


def inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    docs = [Document(f"a{i}", text(i), "books") for i in range(12)]
    docs.append(Document("dup-exact", docs[0].text, "books"))  # exact copy (another id)
    words = docs[1].text.split()
    docs.append(Document("dup-near", " ".join(words[:-2] + ["indeed", "so"]), "books"))
    docs.append(Document("mail", text(99) + " Write to jane.doe@example.com for details.", "books"))
    docs.append(Document("junk", "buy now " * 200, "spam"))
    docs.append(Document("fr", "Le petit chat dort sur le canapé pendant que la pluie tombe doucement sur la ville. "
                         "Les enfants lisent des livres et la maison est calme ce soir. Demain, nous irons au "
                         "marché acheter des fruits et du pain frais pour toute la famille.", "livres"))
    write_jsonl(d / "a.jsonl.gz", docs[:9])
    write_jsonl(d / "b.jsonl", docs[9:])
    (d / "notes.txt").write_text(text(50))
    (d / "bad.txt").write_bytes(b"\xff\xfe not utf-8 \x80\x81")
    (d / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n')[:-10])
    return d


def run(tmp_path, inp, out, workers=1):
    first, last = stage_profile("curated")
    return curate(CurateConfig(inputs=[str(inp)], output=out, first_stages=first, last_stages=last, workers=workers))


def outputs(out):
    return [(d.id, d.text, d.meta.get("lang")) for p in sorted((out / "curated").glob("part-*.jsonl.gz"))
            for d in read_jsonl(p)]


def test_curation_end_to_end(tmp_path):
    inp = inputs(tmp_path)
    report = run(tmp_path, inp, tmp_path / "out")
    docs = outputs(tmp_path / "out")
    ids = [d[0] for d in docs]
    assert "dup-exact" not in ids and "dup-near" not in ids and "a0" in ids and "a1" in ids
    assert "junk" not in ids  # repetition rules
    assert report["dedup"]["exact_duplicates"] >= 1 and report["dedup"]["near_duplicates"] >= 1
    by_id = {d[0]: d for d in docs}
    assert "<EMAIL>" in by_id["mail"][1] and "example.com" not in by_id["mail"][1]
    assert by_id["fr"][2] == "fr" and by_id["a2"][2] == "en"
    assert report["sources"]["books"]["docs_in"] == 15
    assert any("broken" in p for p in report["skipped_files"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| dedup |" in md and "## Languages" in md
    assert json.loads((tmp_path / "out" / "report.json").read_text())["inputs"] == 5


def test_resume_and_worker_count_do_not_change_outputs(tmp_path):
    inp = inputs(tmp_path)
    run(tmp_path, inp, tmp_path / "one", workers=1)
    run(tmp_path, inp, tmp_path / "two", workers=2)
    assert outputs(tmp_path / "one") == outputs(tmp_path / "two")
    # a run killed after pass 1 of some parts: their finished outputs are kept, the rest redone
    out = tmp_path / "one"
    kept = (out / "work" / "pass1" / "part-00000.jsonl.gz").stat().st_mtime_ns
    for p in (out / "curated").glob("*"):
        p.unlink()
    (out / "work" / "pass1" / "part-00001.stats.json").unlink()
    (out / "work" / "dedup.json").unlink()
    run(tmp_path, inp, out)
    assert (out / "work" / "pass1" / "part-00000.jsonl.gz").stat().st_mtime_ns == kept
    assert outputs(out) == outputs(tmp_path / "two")


def test_bad_configuration_fails_before_work(tmp_path):
    with pytest.raises(AFMError, match="no such file or directory"):
        run(tmp_path, tmp_path / "missing", tmp_path / "out")
    inp = inputs(tmp_path)
    run(tmp_path, inp, tmp_path / "out")
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text(text(7))
    with pytest.raises(AFMError, match="holds a run over other inputs"):
        run(tmp_path, other, tmp_path / "out")
    with pytest.raises(AFMError, match="unknown stage profile"):
        stage_profile("nope")
