"""The pipeline on an object store: a real S3-protocol server (moto's) on localhost, started here.

The server runs as its own process on 127.0.0.1 at a free port; commands reach it through
``--storage-option endpoint_url=...`` and take credentials from the AWS_* environment, as a user's
would. Precompute is killed with SIGKILL mid-shard and resumed; the resumed store's objects are
byte-identical to an uninterrupted local precompute with the same settings. `kd inspect`,
`kd verify` and two-rank DeepSpeed training (then a resume) read the store over S3.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_FLAGS, kill_when_paused, pause_env, store_files
from test_train import TINY_DS, _base, _check, _free_port, _losses, run_cli

from offline_kd.cli.kd import main as kd

BUCKET = "kd-test"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer at {url} within {timeout}s")


@contextlib.contextmanager
def moto_s3_server(log: Path, bucket: str = BUCKET):
    """Run moto's S3 server on 127.0.0.1 at a free port with ``bucket`` made and AWS_* test
    credentials in the environment; yields its endpoint URL."""
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    port = _free_port()
    with open(log, "wb") as sink:  # a file, not a pipe: the server logs every request
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(endpoint, proc, log)
        _fs(endpoint).mkdir(bucket)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """``http://127.0.0.1:PORT`` of a moto S3 server with the bucket ``kd-test``; AWS_* credentials set."""
    with moto_s3_server(tmp_path_factory.mktemp("moto") / "server.log") as endpoint:
        yield endpoint


def _fs(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


def _objects(endpoint: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` (relative key → bytes)."""
    fs = _fs(endpoint)
    return {p[len(prefix) + 1 :]: fs.cat(p) for p in fs.find(prefix)}


def _precompute_cmd(teacher, corpus, url, endpoint, *extra) -> list[str]:
    return [
        sys.executable, "-m", "offline_kd.cli.kd", "precompute", "--teacher", str(teacher),
        "--corpus", str(corpus), "--output", url, "--storage-option", f"endpoint_url={endpoint}",
        *TINY_FLAGS, *extra,
    ]  # fmt: skip


def _committed_on_s3(endpoint: str, key: str) -> int:
    fs = _fs(endpoint)
    try:
        return len(fs.ls(f"{key}/committed/c", refresh=True))
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def resumed_s3_store(s3_endpoint, tiny_teacher, tiny_corpus, tmp_path_factory):
    """A store precomputed to S3, killed with SIGKILL after two commits, then resumed.

    Returns (url, shards committed before the kill, the resumed run's stdout)."""
    key = f"{BUCKET}/resumed.zarr"
    url = f"s3://{key}"
    cmd = _precompute_cmd(tiny_teacher, tiny_corpus, url, s3_endpoint)
    marker = tmp_path_factory.mktemp("pause") / "pause"  # never created: killed before the third commit
    proc = subprocess.Popen(cmd, env=pause_env(marker, before_commit=3), stderr=subprocess.PIPE)
    kill_when_paused(proc, marker)
    before = _committed_on_s3(s3_endpoint, key)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return url, before, res.stdout


@pytest.mark.slow
def test_precompute_killed_and_resumed_on_s3_equals_uninterrupted(s3_endpoint, resumed_s3_store, tiny_store):
    from offline_kd.store.signal_store import SignalStore

    url, before, stdout = resumed_s3_store
    store = SignalStore.open(url, storage_options={"endpoint_url": s3_endpoint})
    assert 2 <= before < store.meta.num_shards  # the kill left the store partial
    assert f"skipped {before} already committed" in stdout and "complete" in stdout
    assert store.is_complete()
    remote, local = _objects(s3_endpoint, url[len("s3://") :]), store_files(tiny_store)
    assert sorted(remote) == sorted(local)
    assert [k for k in local if remote[k] != local[k]] == []  # byte-identical, object by object


@pytest.mark.slow
def test_inspect_and_verify_read_the_store_over_s3(s3_endpoint, resumed_s3_store, tiny_store, tiny_teacher):
    url, _, _ = resumed_s3_store
    option = ["--storage-option", f"endpoint_url={s3_endpoint}"]
    r = CliRunner().invoke(kd, ["inspect", url, "--json", *option])
    assert r.exit_code == 0, r.output
    remote = json.loads(r.stdout)
    local = json.loads(CliRunner().invoke(kd, ["inspect", str(tiny_store), "--json"]).stdout)
    assert remote.pop("url") == url and local.pop("url") == str(tiny_store)
    assert remote == local and remote["complete"]
    r = CliRunner().invoke(kd, ["verify", url, "--teacher", str(tiny_teacher), "--sample", "2", *option])
    assert r.exit_code == 0, r.output
    assert "checked" in r.output and "teacher rerun on 2 sequence(s)" in r.output and "OK" in r.output


@pytest.mark.slow
def test_two_rank_training_reads_s3_and_resumes(s3_endpoint, resumed_s3_store, tmp_path):
    """Two ranks train two steps from the S3 store; with the step-2 checkpoint removed (a crash
    before it was saved), a resumed run redoes step 2 from step 1 with the same loss."""
    import shutil

    url, _, _ = resumed_s3_store
    launcher = lambda: ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port())]  # noqa: E731
    s3 = [f"endpoint_url={s3_endpoint}", "key=testing", "secret=testing"]  # credentials as options too
    args = _base(url, tmp_path) + [x for o in s3 for x in ("--storage-option", o)]
    args += ["--epochs", "1", "--save-every", "1", "--max-steps", "2", "--schedule-steps", "6"]
    _check(run_cli(args + ["--debug-param-hash"], launcher()))
    uninterrupted = _losses(tmp_path)
    assert len(uninterrupted) == 2
    hashes = [(tmp_path / "debug" / f"params_rank{r}.sha256").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    saved = json.loads((tmp_path / "train_config.json").read_text())["storage_options"]
    assert saved == {"endpoint_url": s3_endpoint, "key": "***", "secret": "***"}  # no credentials on disk
    shutil.rmtree(tmp_path / "checkpoints" / "step00000002")
    proc = run_cli(args + ["--resume"], launcher())
    _check(proc)
    assert "resumed from step00000001" in proc.stdout + proc.stderr
    assert _losses(tmp_path) == uninterrupted
    assert (tmp_path / "checkpoints" / "step00000002" / "COMPLETE").exists()
    assert (tmp_path / "final" / "model.safetensors").exists()


# ------------------------------------------------------------------------- bad store URLs
# Each fails with one `Error: ...` line naming the URL, exit code 2, before the teacher or the corpus
# is touched: the teacher and corpus given do not exist, so reaching them would fail differently.


def _bad_urls(endpoint: str) -> list[tuple[list[str], str]]:
    dead = f"http://127.0.0.1:{_free_port()}"
    return [
        (
            ["s3://no-such-bucket/x.zarr", f"endpoint_url={endpoint}"],
            "bucket 'no-such-bucket' does not exist",
        ),
        # one attempt, not botocore's five with back-off (a dotted key nests: config_kwargs={"retries": ...})
        (
            ["s3://kd-test/x.zarr", f"endpoint_url={dead}", "config_kwargs.retries.max_attempts=1"],
            f"cannot reach bucket 'kd-test' at {dead}",
        ),
        (["s3://kd-test/x.zarr", f"endpoint_url={endpoint}", "no_such_option=1"], "bad --storage-option"),
        (["nosuch://kd/x.zarr", "a=b"], "unknown URL scheme 'nosuch'"),
    ]


def _one_error_line(text: str, url: str, message: str) -> None:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert repr(url) in errors[0] and message in errors[0], errors[0]


@pytest.mark.parametrize("command", ["precompute", "inspect", "verify"])
def test_bad_store_url_fails_in_one_line_before_any_work(s3_endpoint, tmp_path, command):
    for (url, *options), message in _bad_urls(s3_endpoint):
        opts = [x for o in options for x in ("--storage-option", o)]
        if command == "precompute":
            argv = ["precompute", "--teacher", str(tmp_path / "no_teacher"), "--corpus", "no_corpus.txt"]
            argv += ["--output", url, *opts]
        else:
            argv = [command, url, *opts] + (
                ["--teacher", str(tmp_path / "no_teacher")] if command == "verify" else []
            )
        r = CliRunner().invoke(kd, argv)
        assert r.exit_code == 2, (argv, r.output)
        _one_error_line(r.output, url, message)


def test_precompute_refuses_a_prefix_of_other_objects_and_leaves_them(s3_endpoint, tmp_path):
    """Neither a store written among them nor --overwrite may touch objects kd precompute did not write
    (refused before the teacher, which does not exist here, is looked at)."""
    key = f"{BUCKET}/not-a-store"
    _fs(s3_endpoint).pipe(f"{key}/notes.txt", b"the user's")
    url = f"s3://{key}"
    for extra in ([], ["--overwrite"]):
        argv = ["precompute", "--teacher", str(tmp_path / "no_teacher"), "--corpus", "no_corpus.txt"]
        argv += ["--output", url, "--storage-option", f"endpoint_url={s3_endpoint}", *extra]
        r = CliRunner().invoke(kd, argv)
        assert r.exit_code == 2, r.output
        errors = [ln for ln in r.output.splitlines() if ln.startswith("Error: ")]
        assert errors == [
            f"Error: --output {url} is not a signal store: it holds notes.txt, which kd precompute did not write; "
            "choose a new or empty directory (nothing was written or deleted)"
        ], r.output
    assert _objects(s3_endpoint, key) == {"notes.txt": b"the user's"}


def test_train_refuses_a_missing_bucket_in_one_line(s3_endpoint, tmp_path):
    url = "s3://no-such-bucket/x.zarr"
    args = ["--store", url, "--student", "distil", "--output", tmp_path / "run"]
    args += ["--deepspeed_config", TINY_DS, "--storage-option", f"endpoint_url={s3_endpoint}"]
    proc = run_cli(args)
    assert proc.returncode == 2
    _one_error_line(proc.stderr, url, "bucket 'no-such-bucket' does not exist")
    assert not (tmp_path / "run").exists()


def test_missing_s3fs_names_the_extra(tmp_path):
    """Without s3fs installed (made unimportable here), an s3:// store names the extra to install."""
    code = "import sys; sys.modules['s3fs'] = None; from offline_kd.cli.kd import main; main()"
    for argv in (
        [
            "precompute",
            "--teacher",
            str(tmp_path / "none"),
            "--corpus",
            "none.txt",
            "--output",
            "s3://kd-test/x",
        ],
        ["inspect", "s3://kd-test/x"],
        ["verify", "s3://kd-test/x"],
    ):
        proc = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        _one_error_line(proc.stderr, "s3://kd-test/x", "pip install 'offline-kd[s3]'")
    # Training, before DeepSpeed starts or the run directory is made.
    code = "import sys; sys.modules['s3fs'] = None; from offline_kd.cli.train import main; sys.exit(main())"
    args = ["--store", "s3://kd-test/x", "--student", "distil", "--output", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, "s3://kd-test/x", "pip install 'offline-kd[s3]'")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------- the lease


def test_the_lease_on_s3_one_taker_wins_a_second_is_refused_an_expired_one_is_taken_over(s3_endpoint):
    """S3's conditional put (If-None-Match: *) makes creation exclusive: of takers starting at once
    exactly one holds the lease; a holder elsewhere whose heartbeat stopped expires."""
    import threading

    from offline_kd.store.lease import Holder, LeaseError, StoreLease

    url, options = f"s3://{BUCKET}/leased.zarr", {"endpoint_url": s3_endpoint}
    start, won, refused = threading.Barrier(6), [], []

    def contend():
        start.wait()
        try:
            won.append(StoreLease(url, 0, expiry=30, storage_options=options).acquire())
        except LeaseError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(won) == 1 and len(refused) == 5, refused
        assert all(f"lease file {url}.leases/rank0.000000.json" in e for e in refused), refused
        won[0].ensure_held()
    finally:
        for lease in won:
            lease.release()
    fs = _fs(s3_endpoint)
    assert not fs.exists(f"{BUCKET}/leased.zarr.leases/rank0.000000.json")
    now = time.time()
    other = Holder(0, 1, "t0", "elsewhere", "elsewhere|boot|ns", 4242, "1", now, now, 600.0)
    fs.pipe_file(f"{BUCKET}/leased.zarr.leases/rank0.000003.json", other.to_json())
    with pytest.raises(LeaseError, match=r"pid 4242 on elsewhere"):
        StoreLease(url, 0, storage_options=options).acquire()
    stale = now - 601.0  # the same holder, its last heartbeat over an expiry ago
    other = Holder(0, 1, "t0", "elsewhere", "elsewhere|boot|ns", 4242, "1", stale, stale, 600.0)
    fs.pipe_file(f"{BUCKET}/leased.zarr.leases/rank0.000003.json", other.to_json())
    with StoreLease(url, 0, storage_options=options) as lease:
        assert lease.generation == 4
        assert fs.ls(f"{BUCKET}/leased.zarr.leases", refresh=True) == [
            f"{BUCKET}/leased.zarr.leases/rank0.000004.json"
        ]
    fs.invalidate_cache()
    assert not fs.exists(f"{BUCKET}/leased.zarr.leases/rank0.000004.json")


# ------------------------------------------------------------------------- dry run


def test_dry_run_to_s3_needs_no_weights_and_writes_nothing(
    s3_endpoint, tiny_teacher, tiny_corpus, tiny_store, tmp_path
):
    import shutil

    from offline_kd.store.signal_store import SignalStore

    shape_only = tmp_path / "teacher_without_weights"
    shutil.copytree(tiny_teacher, shape_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    url = f"s3://{BUCKET}/dry.zarr"
    argv = ["precompute", "--teacher", str(shape_only), "--corpus", str(tiny_corpus), "--output", url]
    r = CliRunner().invoke(
        kd, argv + TINY_FLAGS + ["--dry-run", "--storage-option", f"endpoint_url={s3_endpoint}"]
    )
    assert r.exit_code == 0, r.output
    n = SignalStore.open(str(tiny_store)).meta.num_sequences
    assert f"corpus {tiny_corpus}: read whole" in r.output  # a corpus smaller than the sample
    assert f"\n{n:,} sequences" in r.output  # so the estimate is exact
    assert f"free space cannot be checked for the remote store {url!r}" in r.output
    assert not _fs(s3_endpoint).exists(f"{BUCKET}/dry.zarr")
