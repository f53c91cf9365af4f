"""`detrforge inspect`'s report in a real headless Chromium: no JavaScript error, one row per
ground-truth object with a verdict, a click on a row highlights its query; and the README's
inspect command runs."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / ".cache" / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (make test installs it)")


def _tiny_export_writer():
    """The inference tests' tiny export writer (one definition of a stage-like export)."""
    spec = importlib.util.spec_from_file_location("inference_conftest",
                                                  ROOT / "tests" / "inference" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_tiny_export


def readme_inspect_argv() -> list[str]:
    """The `detrforge inspect ...` command of the README's "See what each query saw" section."""
    text = (ROOT / "README.md").read_text().partition("### See what each query saw")[2]
    match = re.search(r"detrforge inspect ((?:\\\n|[^\n])+)", text)
    assert match, "README.md has no `detrforge inspect` command"
    return ["inspect", *shlex.split(match.group(1).replace("\\\n", " "))]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The README's inspect command with the model and data swapped for tiny ones."""
    from launch.cli import main
    from pipeline.data.samples import make_samples

    base = tmp_path_factory.mktemp("inspect")
    samples = base / "samples"
    make_samples(samples, size="tiny", seed=0)
    export = _tiny_export_writer()(base / "export", samples)
    out = base / "out"
    argv = readme_inspect_argv()
    model_at = argv.index(next(a for a in argv[1:] if not a.startswith("data/")))
    argv[model_at] = str(export)
    argv = [a.replace("data/samples", str(samples)) for a in argv]
    argv[argv.index("--out") + 1] = str(out)
    assert main(argv) == 0
    return {"out": out, "summary": json.loads((out / "inspect.json").read_text()), "base": base}


def chromium(args: list[str], profile: Path, timeout_s: float = 40.0) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout_s)


def test_report_in_headless_chromium(report, tmp_path):
    url = (report["out"] / "report.html").resolve().as_uri()
    done = chromium(["--dump-dom", url + "?selftest"], tmp_path / "profile")
    found = re.search(r'<pre id="selftest">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the page's self-test did not run (a script error?): {done.stderr[-2000:]}"
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["errors"] == []
    assert "Uncaught" not in done.stderr  # console errors, reported by --enable-logging
    rows = [row for image in report["summary"]["images"] for row in image["ground_truth"]]
    assert rows and result["gt_rows"] == len(rows) == result["verdicts"]
    first = next(row for row in report["summary"]["images"][0]["ground_truth"]
                 if row["matched_query"] is not None)
    assert result["clicked"] == f"g-0-{first['object']}"
    assert result["highlighted"] == [f"q-0-{first['matched_query']}"]
    assert result["showing"] == f"q{first['matched_query']}"

    shot = ARTIFACTS / "inspect_report.png"  # kept as the test's artifact
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    done = chromium([f"--screenshot={shot}", "--window-size=1280,900", url + "?selftest"],
                    tmp_path / "profile2")
    assert shot.is_file() and shot.stat().st_size > 10_000, done.stderr[-2000:]


def test_readme_command_counts_every_object(report, capsys):
    summary = report["summary"]
    assert sum(summary["verdicts"].values()) == sum(len(i["ground_truth"]) for i in summary["images"])
    assert all(row["verdict"] for image in summary["images"] for row in image["ground_truth"])
