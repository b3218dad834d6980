import contextlib
import gzip
import json
import os
import re
import signal
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

from afm.data.document import Document, read_jsonl, write_jsonl
from afm.data.pipeline import CurateConfig, curate, stage_profile
from afm.errors import AFMError

from .conftest import python

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


# ---- `afm data curate` interrupted by a worker's death or Ctrl-C, then resumed ------------------------
#
# Real runs of the CLI over a corpus big enough (10 files of ~0.4 MB of Python standard library source)
# that pass 1 lasts a few seconds on 2 workers; a test waits for the first finished part, then strikes.


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory):
    """(inputs, an uninterrupted run's output directory)."""
    root = tmp_path_factory.mktemp("interrupt")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = iter(sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts))
    inp = root / "in"
    for i in range(10):
        docs, chars = [], 0
        while chars < 400_000:
            path = next(sources)
            text = path.read_text(encoding="utf-8", errors="replace")
            docs.append(Document(str(path.relative_to(stdlib)), text, "stdlib"))
            chars += len(text)
        write_jsonl(inp / f"in-{i:02d}.jsonl", docs)
    reference = root / "reference"
    r = subprocess.run(curate_command(inp, reference), capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    return inp, reference


def curate_command(inp, out):
    return [python(), "-m", "afm", "data", "curate", str(inp), "--out", str(out), "--workers", "2"]


@contextlib.contextmanager
def curate_run_mid_way(inp, out):
    """A running `afm data curate` in its own process group, as a shell starts a job (Ctrl-C goes to
    the driver and its workers), caught once its first part has finished: (the process, its two
    workers' pids). On leaving, whatever the test found, no process of it is left."""
    proc = subprocess.Popen(curate_command(inp, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        wait_for_first_part(proc, out)
        workers = workers_in(proc.pid)
        assert len(workers) == 2
        yield proc, workers
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def wait_for_first_part(proc, out):
    deadline = time.monotonic() + 120
    while not any((out / "work" / "pass1").glob("part-*.stats.json")):
        assert proc.poll() is None, f"curate ended before it could be interrupted: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "no part finished in 120 s"
        time.sleep(0.02)


def processes():
    """{pid: (state, parent pid, process group, command line)} of the live processes, from /proc."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # it ended meanwhile
                continue
            state, ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
            if state != "Z":
                found[int(name)] = (state, int(ppid), int(pgrp), cmdline)
    return found


def workers_in(group):
    """The live worker processes of a curate run started by `start_curate` (its pid is its group)."""
    return sorted(pid for pid, (_, _, pgrp, cmdline) in processes().items()
                  if pgrp == group and "spawn_main" in cmdline)


def finished_parts(out):
    """{file: mtime} of every part file whose stats file (written last) exists."""
    return {p: p.stat().st_mtime_ns for d in (out / "work" / "pass1", out / "curated")
            for stats in d.glob("part-*.stats.json") for p in d.glob(stats.name.split(".")[0] + ".*")}


def resume_matches_uninterrupted(inp, out, reference):
    kept = finished_parts(out)
    kept_pass1 = len(list((out / "work" / "pass1").glob("part-*.stats.json")))
    assert 0 < kept_pass1 < 10
    t0 = time.monotonic()
    r = subprocess.run(curate_command(inp, out), capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert f"[stages] kept {kept_pass1} finished parts" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # not recomputed
    for d in ("curated", "work/pass1"):  # the same files, and no temporary file left by the interruption
        assert sorted(os.listdir(out / d)) == sorted(os.listdir(reference / d))
    for p in sorted((reference / "curated").iterdir()) + [reference / "work" / "dedup.json"]:
        assert (out / p.relative_to(reference)).read_bytes() == p.read_bytes(), p.name
    report, expected = (json.loads((d / "report.json").read_text()) for d in (out, reference))
    for key in ("seconds", "output"):
        del report[key], expected[key]
    assert report == expected
    return time.monotonic() - t0


def test_curate_stops_when_a_worker_dies_and_resumes(stdlib_corpus, tmp_path):
    inp, reference = stdlib_corpus
    out = tmp_path / "out"
    with curate_run_mid_way(inp, out) as (proc, workers):
        os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer does
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=30)  # it used to wait forever for the lost part
        print(f"exited {time.monotonic() - t0:.2f} s after the kill")
        assert proc.returncode == 1 and "Traceback" not in stderr
        error = stderr.splitlines()[-1]
        assert [line for line in stderr.splitlines() if "error" in line] == [error]
        lost = re.fullmatch(r"afm data: error: the worker curating work/pass1/(part-\d{5}) "
                            r"\(from \S+/in-\d\d\.jsonl\) "
                            r"was killed by SIGKILL .*; that part is lost, finished parts are kept: "
                            r"rerun the same command to resume", error)
        assert lost, error
        assert not (out / "work" / "pass1" / f"{lost[1]}.stats.json").exists()
        assert workers_in(proc.pid) == []  # the other worker was stopped too
    print(f"resumed in {resume_matches_uninterrupted(inp, out, reference):.1f} s")


def test_curate_stops_on_ctrl_c_and_resumes(stdlib_corpus, tmp_path):
    inp, reference = stdlib_corpus
    out = tmp_path / "out"
    with curate_run_mid_way(inp, out) as (proc, workers):
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: a terminal signals the whole foreground process group
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=30)
        print(f"exited {time.monotonic() - t0:.2f} s after Ctrl-C")
        assert proc.returncode == 130 and "Traceback" not in stderr
        assert stderr.splitlines()[-1] == (f"interrupted: finished parts are kept in {out}; "
                                           "rerun the same command to resume")
        assert len(stderr.strip().splitlines()) == 2  # the progress line and that one
        assert workers_in(proc.pid) == [] and not any(pid in processes() for pid in workers)  # no orphan
    print(f"resumed in {resume_matches_uninterrupted(inp, out, reference):.1f} s")
