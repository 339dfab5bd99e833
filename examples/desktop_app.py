"""A small desktop window over the request engine: pick an input, see a preview, ask two
questions at once, watch both answers stream, stop either one.

    pip install PySide6-Essentials          # the optional example dependency (extra `desktop`)
    python examples/desktop_app.py [--bundle DIR]

The window never blocks: the engine runs requests on its own threads and delivers each
answer's text through a Qt signal, which Qt queues onto the GUI thread. Stop cancels a
request at once (its slot is freed in the engine's next step). Without --bundle the demo
bundle is used (RANDOM weights: the answers are meaningless text).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import (
    QApplication, QComboBox, QFileDialog, QHBoxLayout, QLabel, QLineEdit, QMainWindow, QPlainTextEdit,
    QPushButton, QVBoxLayout, QWidget,
)

from onellm.runtime.decoder import Sampling
from onellm.runtime.engine import Engine, Media, Request
from onellm.runtime.modalities import all_modalities


def modality_for(path: Path) -> str | None:
    """The modality a file most likely is, by extension (maps with a photo are not offered here)."""
    ext = path.suffix.lower()
    for name, spec in all_modalities().items():
        if not spec.requires_image and ext in spec.file_types:
            return name
    return None


class _Bridge(QObject):
    """Carries engine events (from its threads) to the GUI thread."""

    event = Signal(str, object)


class AnswerPane(QWidget):
    """One question, its streamed answer, Ask and Stop."""

    def __init__(self, window: MainWindow, title: str) -> None:
        super().__init__()
        self.window = window
        self.handle = None
        self.status = QLabel(f"{title}: idle")
        self.question = QLineEdit()
        self.question.setPlaceholderText("Ask about the input ...")
        self.answer = QPlainTextEdit()
        self.answer.setReadOnly(True)
        self.ask_button = QPushButton("Ask")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.title = title
        self.bridge = _Bridge()
        self.bridge.event.connect(self._on_event)  # queued: emitted from the engine's thread
        row = QHBoxLayout()
        row.addWidget(self.question)
        row.addWidget(self.ask_button)
        row.addWidget(self.stop_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.status)
        layout.addLayout(row)
        layout.addWidget(self.answer)
        self.ask_button.clicked.connect(self.ask)
        self.stop_button.clicked.connect(self.stop)
        self.result = None

    def ask(self) -> None:
        text = self.question.text().strip()
        if not text:
            return
        self.answer.clear()
        self.result = None
        media = self.window.media()
        req = Request(messages=[("user", text)], media=media, sampling=self.window.sampling)
        try:
            self.handle = self.window.engine.submit(req, on_event=self.bridge.event.emit)
        except Exception as exc:  # noqa: BLE001 - shown in the window
            self.status.setText(f"{self.title}: error: {exc}")
            return
        self.status.setText(f"{self.title}: answering ...")
        self.ask_button.setEnabled(False)
        self.stop_button.setEnabled(True)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()

    def _on_event(self, kind: str, value) -> None:
        if kind == "text":
            self.answer.insertPlainText(value)
            return
        self.ask_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        if kind == "done":
            self.result = value
            self.status.setText(f"{self.title}: {value.finish_reason} ({value.completion_tokens} tokens, "
                                f"first after {value.ttft_s * 1000:.0f} ms)")
        else:
            self.status.setText(f"{self.title}: error: {value}")

    @property
    def busy(self) -> bool:
        return self.handle is not None and not self.handle.done


class MainWindow(QMainWindow):
    """Input picker + preview on top, two answer panes below."""

    def __init__(self, engine: Engine, sampling: Sampling | None = None) -> None:
        super().__init__()
        self.engine = engine
        self.sampling = sampling or Sampling(max_new_tokens=128)
        self.path: Path | None = None
        self.setWindowTitle("onellm" + (" - RANDOM weights demo" if engine.random_weights else ""))
        self.pick_button = QPushButton("Open input ...")
        self.modality = QComboBox()
        self.modality.addItems([m for m in engine.modalities if not all_modalities()[m].requires_image])
        self.preview = QLabel("no input: questions are about text only")
        self.preview.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.preview.setMinimumHeight(160)
        self.panes = [AnswerPane(self, "Question 1"), AnswerPane(self, "Question 2")]
        self.ask_both = QPushButton("Ask both at once")
        top = QHBoxLayout()
        top.addWidget(self.pick_button)
        top.addWidget(self.modality)
        top.addWidget(self.ask_both)
        panes = QHBoxLayout()
        for p in self.panes:
            panes.addWidget(p)
        root = QWidget()
        layout = QVBoxLayout(root)
        layout.addLayout(top)
        layout.addWidget(self.preview)
        layout.addLayout(panes)
        self.setCentralWidget(root)
        self.pick_button.clicked.connect(self.pick)
        self.ask_both.clicked.connect(lambda: [p.ask() for p in self.panes])

    def pick(self) -> None:
        name, _ = QFileDialog.getOpenFileName(self, "Input file")
        if name:
            self.set_input(Path(name))

    def set_input(self, path: Path) -> None:
        self.path = Path(path)
        guess = modality_for(self.path)
        if guess is not None and self.modality.findText(guess) >= 0:
            self.modality.setCurrentText(guess)
        pix = QPixmap(str(self.path))
        if not pix.isNull():
            self.preview.setPixmap(pix.scaled(240, 160, Qt.AspectRatioMode.KeepAspectRatio))
        else:
            size = self.path.stat().st_size
            self.preview.setText(f"{self.path.name}: {size / 1024:.1f} KiB, read as {self.modality.currentText()}")

    def media(self) -> Media | None:
        if self.path is None:
            return None
        return Media(self.modality.currentText(), str(self.path))

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        for p in self.panes:
            p.stop()
        super().closeEvent(event)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="onellm desktop example")
    ap.add_argument("--bundle", default=None, help="bundle directory (default: the demo bundle)")
    ap.add_argument("--parallel", type=int, default=2)
    args = ap.parse_args(argv)
    from onellm.runtime.pipeline import default_bundle_dir

    app = QApplication(sys.argv[:1])
    engine = Engine.load(args.bundle or default_bundle_dir(), parallel=args.parallel)
    try:
        window = MainWindow(engine)
        window.resize(900, 600)
        window.show()
        return app.exec()
    finally:
        engine.close()


if __name__ == "__main__":
    sys.exit(main())
