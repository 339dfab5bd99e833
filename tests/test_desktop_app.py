"""examples/desktop_app.py driven offscreen: two questions at once stream their own answers
while the window keeps processing events; Stop cancels. Skipped without PySide6."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6.QtWidgets")

from onellm.runtime.decoder import Sampling  # noqa: E402
from onellm.runtime.engine import Engine, Media, Request  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WALK = ROOT / "examples" / "imu" / "walk.csv"


@pytest.fixture(scope="module")
def desktop():
    spec = importlib.util.spec_from_file_location("desktop_app", ROOT / "examples" / "desktop_app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def app():
    from PySide6.QtWidgets import QApplication

    return QApplication.instance() or QApplication([])


def _pump(app, until, limit_s: float = 120.0) -> int:
    """Process Qt events until `until()` (bounded); returns how many rounds ran."""
    rounds = 0
    deadline = time.monotonic() + limit_s
    while not until() and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.005)
        rounds += 1
    return rounds


def test_two_questions_at_once_and_stop(desktop, app, tiny_bundle):
    with Engine.load(tiny_bundle, parallel=2) as engine:
        window = desktop.MainWindow(engine, Sampling.greedy(12))
        window.set_input(WALK)
        assert window.modality.currentText() == "imu" and "walk.csv" in window.preview.text()
        questions = ["What is the person doing?", "Is it fast?"]
        for pane, q in zip(window.panes, questions):
            pane.question.setText(q)
        window.ask_both.click()
        assert all(p.busy or p.result for p in window.panes)
        rounds = _pump(app, lambda: all(p.result is not None for p in window.panes))
        assert rounds > 0  # the GUI thread kept running events while both answered
        for pane, q in zip(window.panes, questions):
            alone = engine.submit(Request(messages=[("user", q)], media=Media("imu", str(WALK)),
                                          sampling=Sampling.greedy(12))).wait(60)
            assert pane.result.tokens == alone.tokens
            assert pane.answer.toPlainText() == alone.text
            assert pane.ask_button.isEnabled() and not pane.stop_button.isEnabled()

        # Stop: a long answer, cancelled once its first text arrived
        window.sampling = Sampling.greedy(400)
        pane = window.panes[0]
        real = engine.ctx.decode
        engine.ctx.decode = lambda batch: (time.sleep(0.005), real(batch))[1]  # slow enough to stop mid-answer
        try:
            pane.question.setText("Tell me everything.")
            pane.ask_button.click()
            _pump(app, lambda: pane.answer.toPlainText() != "" or pane.result is not None)
            pane.stop_button.click()
            _pump(app, lambda: pane.result is not None)
        finally:
            engine.ctx.decode = real
        assert pane.result.finish_reason == "cancelled" and "cancelled" in pane.status.text()
        assert engine.stats()["slots_busy"] == 0
        window.close()
