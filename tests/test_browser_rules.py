"""Without Chromium the browser tests skip with the reason, except under CI, where they fail."""

import browser
import pytest
from _pytest.outcomes import Failed, Skipped


@pytest.fixture
def no_chromium(monkeypatch):
    monkeypatch.delenv("ISEG_CHROMIUM", raising=False)
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    monkeypatch.setattr(browser.os.path, "exists", lambda path: False)


def test_a_machine_without_chromium_skips_with_what_to_install(no_chromium, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(Skipped, match="apt-get install chromium"):
        browser.chromium_or_skip()


def test_ci_without_chromium_fails(no_chromium, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(Failed, match="must run in CI"):
        browser.chromium_or_skip()


def test_a_chromium_given_by_path_is_used(monkeypatch):
    monkeypatch.setenv("ISEG_CHROMIUM", "/opt/my/chromium")
    assert browser.chromium_or_skip() == "/opt/my/chromium"
