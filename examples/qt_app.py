"""A desktop app with a pullwake runner on its Qt event loop (`runner.qt.QtHost`).

A window with Start/Stop, a live status line, the jobs handled (one line per event, in
order) and an Abort button. The handler is trio code running on the GUI thread, so it
may update widgets directly. Closing the window drains the runner first, without
freezing it.

    pip install 'pullwake-runner[qt]'
    pullwake dev &                                   # the reference server on 127.0.0.1:4437
    python -m examples.qt_app --server http://127.0.0.1:4437
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import trio
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import QApplication, QHBoxLayout, QLabel, QListWidget, QPushButton, QVBoxLayout, QWidget

from runner import Batch, Ended, Health, PullwakeError, Runner, Settings, SubscriptionSpec
from runner.qt import QtHost


class JobsWindow(QWidget):
    """The app's window: controls, status, and the jobs handled."""

    def __init__(self, settings: Settings, *, work_delay: float = 0.0) -> None:
        super().__init__()
        self.setWindowTitle("pullwake jobs")
        self.work_delay = work_delay
        self.subscription = settings.subscriptions[0].id
        self.seen: set[tuple[str, int]] = set()
        """(stream, index) of each event shown: a redelivered batch is not listed twice."""
        self.handled: list[Any] = []
        self.states: list[str] = []
        self.in_handler = False
        self.runner = Runner(settings, handlers={self.subscription: self.handle})
        self.host = QtHost(self.runner, self, health_interval=0.5)

        self.status = QLabel("stopped")
        self.jobs = QListWidget()
        self.start_button, self.stop_button = QPushButton("Start"), QPushButton("Stop")
        self.abort_button = QPushButton("Abort current job")
        buttons = QHBoxLayout()
        for button in (self.start_button, self.stop_button, self.abort_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.jobs)

        self.start_button.clicked.connect(self.host.start)
        self.stop_button.clicked.connect(self.host.stop)
        self.abort_button.clicked.connect(lambda: self.host.abort(self.subscription))
        self.host.stateChanged.connect(self.states.append)
        self.host.healthChanged.connect(self.show_health)
        self.host.failed.connect(self.show_failure)
        self.host.ended.connect(self.show_ended)

    async def handle(self, batch: Batch) -> None:
        """Trio code on the GUI thread: it may touch widgets; it must not block."""
        self.in_handler = True
        try:
            if self.work_delay:
                await trio.sleep(self.work_delay)  # stands for real (non-blocking) work
        finally:
            self.in_handler = False
        for message in batch.messages:
            key = (batch.stream, int(message["n"]))
            if key not in self.seen:
                self.seen.add(key)
                self.handled.append(message)
                self.jobs.addItem(f"{batch.stream} #{message['n']}: {message.get('title', '')}")

    def show_health(self, health: Health) -> None:
        busy = ", ".join(claim.subscription for claim in health.in_flight) or "idle"
        self.status.setText(f"{health.state} ({health.status}) · reconnects {health.reconnect_count} · {busy}")
        self.start_button.setEnabled(health.state == "stopped")
        self.stop_button.setEnabled(health.state != "stopped")

    def show_failure(self, error: PullwakeError) -> None:
        self.status.setText(f"runner failed: {type(error).__name__}: {error}")

    def show_ended(self, ended: Ended) -> None:
        if ended.error is None:
            self.status.setText("stopped")

    def closeEvent(self, event: QCloseEvent) -> None:
        """Drain before closing: the window stays live meanwhile, then closes itself."""
        if self.host.running:
            event.ignore()
            self.status.setText("finishing the current job…")
            self.host.ended.connect(self.close)
            self.host.stop()
        else:
            event.accept()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:4437")
    arguments = parser.parse_args()
    app = QApplication(sys.argv[:1])
    settings = Settings(
        server_url=arguments.server,
        wake_stream="wake/desktop",
        subscriptions=(SubscriptionSpec(id="jobs", pattern="jobs/*"),),
    )
    window = JobsWindow(settings)
    window.resize(520, 400)
    window.show()
    window.host.start()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
