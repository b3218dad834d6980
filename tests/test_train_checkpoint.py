"""Damaged training checkpoints: a micro run's newest checkpoint is damaged on disk in each way a file can
be (truncated, emptied, bits flipped, deleted, overwritten), and resuming reports it in one line, falls
back to the previous checkpoint and continues exactly as an uninterrupted run."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from torch.distributed.checkpoint import FileSystemReader

from .test_train import data, losses, run_train  # noqa: F401 - `data` is test_train's fixture, used here

NEWEST, PREVIOUS = "step-00000008", "step-00000004"


def args(data, out, extra=()):  # noqa: F811 - the fixture's value
    """12 pre-training steps and 2 mid-training steps, a checkpoint every 4: steps 4, 8, 12 and 14."""
    return ["--phases.0.data", str(data / "pre"), "--phases.1.data", str(data / "mid"), "--out_dir", str(out),
            "--phases.0.steps", "12", "--phases.1.steps", "2", "--phases.0.eval_every", "6",
            "--checkpoint_every", "4", "--keep_last", "10", *extra]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("reference") / "run"
    run_train(args(data, out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        PREVIOUS, NEWEST, "step-00000012", "step-00000014"]
    return out


def stopped_after_step_8(reference, dest):
    """A copy of the reference run as a run killed after its step-8 checkpoint would have left it."""
    shutil.copytree(reference, dest)
    for c in (dest / "checkpoints").iterdir():
        if c.name > NEWEST:
            shutil.rmtree(c)
    (dest / "summary.json").unlink()
    return dest


def largest_model_tensor(checkpoint, file):
    """(offset, length) of the largest model tensor that DCP stored in `checkpoint`'s data file `file`."""
    md = FileSystemReader(str(checkpoint)).read_metadata()
    items = [v for k, v in md.storage_data.items() if k.fqn.startswith("model.") and v.relative_path == file]
    info = max(items, key=lambda v: v.length)
    return info.offset, info.length


def flip_exponents(checkpoint, file=None, count=16):
    """Set every exponent bit of `count` float32 values in the middle of the largest model tensor of a
    data file: the values become inf or NaN and the file still parses."""
    file = file or DATA
    offset, length = largest_model_tensor(checkpoint, file)
    path = checkpoint / file
    raw = bytearray(path.read_bytes())
    start = offset + (length // 2 & ~3)  # the tensor's data is 64-byte aligned within its entry
    for i in range(start, start + 4 * count, 4):
        raw[i + 3] |= 0x7F
        raw[i + 2] |= 0x80
    path.write_bytes(bytes(raw))


def overwrite(path, offset, raw):
    """Replace bytes in place: the file keeps its size."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(raw)


def truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


DATA = "__0_0.distcp"
SHORT = r"is \d+ bytes; manifest.json says \d+ \(truncated or overwritten\)"
CORRUPT = r"does not match its sha256 checksum \(the file is corrupted\)"
# damage -> (what it does to the newest checkpoint, the reason resuming gives)
DAMAGE = {
    "truncated-data": (lambda c: truncate(c / DATA, (c / DATA).stat().st_size // 2),
                       rf"{DATA} {SHORT}"),
    "flipped-exponents": (flip_exponents, rf"{DATA} {CORRUPT}"),
    "no-metadata": (lambda c: (c / ".metadata").unlink(), r"\.metadata is missing"),
    "corrupt-metadata": (lambda c: overwrite(c / ".metadata", 0, b"\x80\x05garbage" * 16),
                         rf"\.metadata {CORRUPT}"),
    "invalid-trainer-json": (lambda c: (c / "trainer.json").write_text('{"phase": 0, "global_step": 8,'),
                             rf"trainer.json {SHORT}"),
    "no-trainer-json": (lambda c: (c / "trainer.json").unlink(), r"trainer.json is missing"),
    "no-rng": (lambda c: (c / "rng-0.pt").unlink(), r"rng-0.pt is missing"),
    "empty-data": (lambda c: (c / DATA).write_bytes(b""),
                   rf"{DATA} is 0 bytes; manifest.json says \d+ \(truncated or overwritten\)"),
    "corrupt-manifest": (lambda c: (c / "manifest.json").write_text("{"),
                         r"manifest.json is not valid JSON \(.+\)"),
    "no-manifest": (lambda c: (c / "manifest.json").unlink(), r"manifest.json is missing"),
}


def unverified_warning(checkpoint):
    return (f"WARNING {checkpoint} has no manifest.json (written before checkpoints were checksummed); "
            "its files are not verified")


def assert_fell_back(r, run, reason, reference, unverified=False, verdict="is damaged"):
    """One warning naming the damaged checkpoint and why, no traceback, a resume from the intact one and
    then the reference run's losses, bit for bit."""
    assert "Traceback" not in r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("WARNING")]
    newest, previous = run / "checkpoints" / NEWEST, run / "checkpoints" / PREVIOUS
    if unverified:
        assert warnings.pop(-1) == unverified_warning(previous)
        if unverified_warning(newest) in warnings:  # damage found after the checks of its files
            warnings.remove(unverified_warning(newest))
    assert len(warnings) == 1 and re.fullmatch(
        rf"WARNING {re.escape(str(newest))} {verdict}: {reason}; falling back to the previous checkpoint",
        warnings[0]), warnings
    assert f"resumed from {previous} (phase 0, step 4)" in r.stderr
    assert [x["loss"] for x in losses(run)] == [x["loss"] for x in losses(reference)]  # bitwise
    assert [x["step"] for x in losses(run)] == list(range(1, 15))


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(data, reference, tmp_path,  # noqa: F811
                                                                  damage):
    run = stopped_after_step_8(reference, tmp_path / "run")
    do, reason = DAMAGE[damage]
    do(run / "checkpoints" / NEWEST)
    r = run_train(args(data, run))
    assert_fell_back(r, run, reason, reference)
    # The run went on and wrote its step-8 checkpoint again, intact.
    manifest = json.loads((run / "checkpoints" / NEWEST / "manifest.json").read_text())
    assert set(manifest["files"]) == {".metadata", DATA, "rng-0.pt", "trainer.json"}


def make_unverified(checkpoint):
    """What a checkpoint written before manifests looks like."""
    (checkpoint / "manifest.json").unlink()
    trainer = json.loads((checkpoint / "trainer.json").read_text())
    del trainer["manifest"]
    (checkpoint / "trainer.json").write_text(json.dumps(trainer))


def test_checkpoints_without_a_manifest_load_and_are_reported_unverified(data, reference,  # noqa: F811
                                                                         tmp_path):
    run = stopped_after_step_8(reference, tmp_path / "run")
    make_unverified(run / "checkpoints" / NEWEST)
    r = run_train(args(data, run))
    assert "Traceback" not in r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("WARNING")]
    assert warnings == [unverified_warning(run / "checkpoints" / NEWEST)]
    assert f"resumed from {run / 'checkpoints' / NEWEST} (phase 0, step 8)" in r.stderr
    assert [x["loss"] for x in losses(run)] == [x["loss"] for x in losses(reference)]


@pytest.mark.parametrize("damage", ["flipped-exponents", "truncated-data", "no-rng", "invalid-trainer-json"])
def test_damaged_unverified_checkpoint_falls_back(data, reference, tmp_path, damage):  # noqa: F811
    """Without a manifest, damage to the data shows only when DCP reads the files (a truncated file) or in
    what it loads (infinite weights): the model and optimizers then hold part of the damaged checkpoint,
    and the previous one, loaded over it, must still continue exactly."""
    run = stopped_after_step_8(reference, tmp_path / "run")
    checkpoint = run / "checkpoints" / NEWEST
    make_unverified(checkpoint)
    make_unverified(run / "checkpoints" / PREVIOUS)
    if damage == "invalid-trainer-json":
        (checkpoint / "trainer.json").write_text('{"phase": 0,')
    else:
        DAMAGE[damage][0](checkpoint)
    r = run_train(args(data, run))
    reason = {
        "flipped-exponents": r"model\.[a-z_.0-9]+weight has 16 non-finite values \(NaN or inf\) of \d+",
        "truncated-data": r"DCP cannot load it \(RuntimeError: PytorchStreamReader failed .+\)",
        "no-rng": r"rng-0.pt is missing",
        "invalid-trainer-json": r"trainer.json is not valid JSON \(.+\)",
    }[damage]
    # Without a manifest a file DCP cannot read may be damaged or may not fit the model: not called damage.
    verdict = "cannot be loaded" if damage == "truncated-data" else "is damaged"
    assert_fell_back(r, run, reason, reference, unverified=True, verdict=verdict)


def test_no_intact_checkpoint_is_a_one_line_error(data, reference, tmp_path):  # noqa: F811
    run = stopped_after_step_8(reference, tmp_path / "run")
    flip_exponents(run / "checkpoints" / NEWEST)
    (run / "checkpoints" / PREVIOUS / "rng-0.pt").unlink()
    r = run_train(args(data, run), check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == (f"afm train: error: cannot resume: no checkpoint in {run / 'checkpoints'} can be used ("
                    f"{NEWEST} is damaged: {DATA} does not match its sha256 checksum "
                    "(the file is corrupted); "
                    f"{PREVIOUS} is damaged: rng-0.pt is missing); restore one, or move the directory away "
                    "to train from the start")
    assert [x["step"] for x in losses(run)] == list(range(1, 15))  # nothing trained, nothing dropped


def test_fallback_into_an_earlier_phase_takes_that_phases_rope(data, tmp_path):  # noqa: F811
    """The newest checkpoint (the end of pre-training: mid-training, with YaRN, comes next) fails only when
    loaded, after RoPE was set up for mid-training; the fallback into pre-training must restore its RoPE."""
    extension = ["--phases.1.context_extension",
                 "{factor: 4.0, original_max_position_embeddings: 64, max_position_embeddings: 512}"]
    ref = tmp_path / "ref"
    run_train(args(data, ref, extension))
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    for c in (run / "checkpoints").iterdir():
        if c.name > "step-00000012":
            shutil.rmtree(c)
        else:
            make_unverified(c)  # so that the damage shows only in what DCP loads
    (run / "summary.json").unlink()
    assert json.loads((run / "checkpoints" / "step-00000012" / "trainer.json").read_text())["phase"] == 1
    flip_exponents(run / "checkpoints" / "step-00000012")
    r = run_train(args(data, run, extension))
    assert "Traceback" not in r.stderr
    assert f"resumed from {run / 'checkpoints' / NEWEST} (phase 0, step 8)" in r.stderr
    assert [x["loss"] for x in losses(run)] == [x["loss"] for x in losses(ref)]


def test_a_changed_model_is_not_called_damage(data, reference, tmp_path):  # noqa: F811
    """Intact checkpoints that do not fit the recipe's model any more: the one-line error says the files
    verify and asks whether the model changed."""
    run = stopped_after_step_8(reference, tmp_path / "run")
    r = run_train(args(data, run, ["--model.overrides", "{intermediate_size: 128}"]), check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"afm train: error: cannot resume: no checkpoint in {run / 'checkpoints'} "
                           f"can be used ({NEWEST} cannot be loaded: DCP cannot load it (")
    assert last.count("its files match manifest.json: did the recipe's model or optimizer change?") == 2


@pytest.mark.slow
def test_two_ranks_agree_on_a_damage_only_one_of_them_checks(data, tmp_path):  # noqa: F811
    """Under torchrun the ranks split the checksums: rank 1 checks rank 0's data file. Both must skip the
    damaged checkpoint, resume from the same one and continue as the uninterrupted 2-rank run."""
    ref = tmp_path / "ref"
    run_train(args(data, ref), torchrun=2)
    run = stopped_after_step_8(ref, tmp_path / "run")
    names = sorted(json.loads((run / "checkpoints" / NEWEST / "manifest.json").read_text())["files"])
    assert names.index(DATA) % 2 == 1  # hashed by rank 1
    flip_exponents(run / "checkpoints" / NEWEST)
    r = run_train(args(data, run), torchrun=2)
    assert_fell_back(r, run, rf"{DATA} {CORRUPT}", ref)
