"""Shared pytest hooks. Nothing here imports ComfyUI: host tests live in tests/host/ and skip without one."""

from pathlib import Path

HOST_TESTS = Path(__file__).parent / "host"


def pytest_configure(config):
    config.addinivalue_line("markers", "host: needs a real ComfyUI host (COMFYUI_PATH); skipped without one")


def pytest_terminal_summary(terminalreporter):
    """One line per reason: how many host tests were skipped and why."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        if "host" not in getattr(report, "keywords", {}) or not isinstance(report.longrepr, tuple):
            continue
        reason = report.longrepr[2].removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():
        terminalreporter.write_line(f"host tests: {count} skipped: {reason}", yellow=True)
