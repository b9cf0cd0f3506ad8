"""pytest plugin of the GPU suite (``-p pytest_jsonl --jsonl PATH``, ``bench/`` on the path): one JSON
line per test phase that ran, appended and flushed as soon as the phase ends, so that a step cut
short by its timeout keeps every result it had (junit XML and pytest-benchmark's JSON are written
at the end only). A benchmark's line carries its timing statistics and ``extra_info``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


_PATH: list[Path] = []  # the --jsonl file, once configured


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--jsonl", default=None, help="append one JSON line per test outcome to this file")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--jsonl"):
        _PATH.append(Path(config.getoption("--jsonl")))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    report = outcome.get_result()
    bench = getattr(item, "funcargs", {}).get("benchmark") if call.when == "call" else None
    stats = getattr(getattr(bench, "stats", None), "stats", None)
    if stats is not None:
        report.user_properties.append(("benchmark", {**stats.as_dict(), "extra_info": dict(bench.extra_info)}))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not _PATH or (report.when != "call" and report.outcome == "passed"):
        return  # a passing setup or teardown says nothing the call's line does not
    line = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
            "duration_s": report.duration, **dict(report.user_properties)}
    if report.failed or report.skipped:
        line["detail"] = str(report.longrepr)[-2000:]
    with _PATH[0].open("a") as fh:
        fh.write(json.dumps(line, default=str) + "\n")
