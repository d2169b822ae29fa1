"""Skips for missing system packages, which CI must not hide.

A few tests need what pip cannot install (Chromium for the MLflow UI test, Debian's
``dataset-fashion-mnist``). On a developer's machine they skip with a reason that starts
with :data:`MISSING`; where ``CI`` is true (``.ci/run`` sets it, as CI services do) such a
skip fails the test instead, so a CI machine that could not install them cannot go green
with those tests quietly skipped.
"""

from __future__ import annotations

import os

import pytest

MISSING = "system package missing:"


def missing(package: str, detail: str = "") -> str:
    """The skip reason for ``package``; the hook below recognises it by its prefix."""
    return f"{MISSING} {package}" + (f" ({detail})" if detail else "")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """Turn a missing-system-package skip into a failure when running in CI."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci() and MISSING in str(report.longrepr):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        reason = str(reason).removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"CI is true, so this skip fails the run: {reason}"
